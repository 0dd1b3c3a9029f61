"""Export to ONNX and torch.export: every written file is run and compared with the eager model."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import torchvision
from export_models import CASES, moved
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.errors import ExportError, FrozenSizeError
from dynoswap.export import export_model, freeze, lookup_format, verify_export
from dynoswap.layers import DynOPool2d

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

FAST = {"resnet18"}
MODELS = [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in CASES]


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("name", MODELS)
def test_export_is_verified_against_eager(tmp_path, name, fmt):
    case, gm = CASES[name], moved(name)
    path = tmp_path / f"{name}.{fmt}"
    result = export_model(gm, path, fmt, input_size=case.input_size, dynamic_batch=(name == "resnet18"))
    assert path.is_file() and result.path == path and result.file_bytes == path.stat().st_size
    assert result.max_abs_diff <= 1e-4 and result.freeze_max_abs_diff is not None
    assert result.freeze_max_abs_diff <= 1e-5  # batch norm folded into the convs: float rounding only
    assert result.dynopools == sum(isinstance(m, DynOPool2d) for m in gm.modules())
    # Checked again here, independently of the exporter, on a fresh input.
    x = torch.randn(result.verified_batches[-1], 3, *case.input_size)
    with torch.no_grad():
        expected = case.output(gm(x))
    if fmt == "onnx":
        got = lookup_format("onnx").run(path, [x])[0][0]
    else:
        got = case.output(torch.export.load(str(path)).module()(x))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert json.loads(json.dumps(result.to_dict()))["format"] == fmt


def test_onnx_file_resizes_to_integer_sizes_with_a_dynamic_batch(tmp_path):
    path = tmp_path / "r18.onnx"
    result = export_model(moved("resnet18"), path, "onnx", dynamic_batch=True)
    assert result.input_size == (64, 56) and result.verified_batches == [1, 2] and result.opset == 18
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 56]
    resizes = [n for n in model.graph.node if n.op_type == "Resize"]
    assert resizes and all(len(n.input) == 4 and n.input[2] == "" and n.input[3] for n in resizes)  # sizes, no scales
    assert not any("alpha" in i.name for i in model.graph.initializer)


def _corrupt_onnx(path):
    model = onnx.load(str(path))
    weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    array = onnx.numpy_helper.to_array(weight).copy()
    array += 0.05
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(model, str(path))


def _corrupt_pt2(path):
    program = torch.export.load(str(path))
    for value in program.state_dict.values():
        if value.is_floating_point() and value.dim() == 4:
            with torch.no_grad():
                value.add_(0.05)
            break
    torch.export.save(program, str(path))


@pytest.mark.parametrize(("fmt", "corrupt"), [("onnx", _corrupt_onnx), ("pt2", _corrupt_pt2)])
def test_corrupted_export_fails_verification(tmp_path, fmt, corrupt):
    gm = moved("resnet18")
    path = tmp_path / f"model.{fmt}"
    export_model(gm, path, fmt)
    assert verify_export(path, gm, (64, 56)) <= 1e-4
    corrupt(path)
    with pytest.raises(ExportError, match=r"does not match the eager model: max abs diff [\d.e+-]+ > 0.0001"):
        verify_export(path, gm, (64, 56))
    path.write_bytes(path.read_bytes()[:1000])  # truncated
    with pytest.raises(ExportError, match="cannot run"):
        verify_export(path, gm, (64, 56))


def test_a_file_that_does_not_match_is_never_left_in_place(tmp_path, monkeypatch):
    fmt = lookup_format("pt2")
    wrong = type(fmt)(
        fmt.name,
        fmt.suffix,
        fmt.requires,
        fmt.write,
        lambda p, xs: [[x.new_zeros(len(x), 10)] for x in xs],
        "broken",
        fmt.detect,
    )
    monkeypatch.setitem(sys.modules["dynoswap.export.formats"]._FORMATS, "pt2", wrong)
    path = tmp_path / "model.pt2"
    with pytest.raises(ExportError, match="does not match the eager model"):
        export_model(moved("resnet18"), path, "pt2")
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_what_it_cannot_serve(tmp_path):
    gm = moved("resnet18")
    with pytest.raises(FrozenSizeError, match=r"frozen at input size \(64, 56\), not \(32, 32\)"):
        export_model(freeze(gm, (64, 56)), tmp_path / "m.pt2", "pt2", input_size=(32, 32))
    with pytest.raises(ExportError, match="opset 17 is too old"):
        export_model(gm, tmp_path / "m.onnx", "onnx", opset=17)
    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_model(gm, tmp_path / "m.tflite", "tflite")
    (tmp_path / "taken.pt2").write_text("mine")
    for overwrite in (False, True):  # a file dynoswap did not write is never replaced, not even with force
        with pytest.raises(FileExistsError, match="not a dynoswap pt2 export"):
            export_model(gm, tmp_path / "taken.pt2", "pt2", overwrite=overwrite)
    assert (tmp_path / "taken.pt2").read_text() == "mine"
    first = export_model(gm, tmp_path / "mine.pt2", "pt2")
    with pytest.raises(FileExistsError, match="already holds a dynoswap pt2 export"):
        export_model(gm, tmp_path / "mine.pt2", "pt2")
    again = export_model(gm, tmp_path / "mine.pt2", "pt2", overwrite=True)
    assert again.max_abs_diff <= 1e-4 and first.path == again.path


def test_ratio_frozen_model_exports_at_any_size_and_plain_models_as_they_are(tmp_path):
    ratio = freeze(moved("resnet18"))
    result = export_model(ratio, tmp_path / "ratio.pt2", "pt2", input_size=(40, 72))
    assert result.dynopools == 0 and result.max_abs_diff <= 1e-4
    plain = torchvision.models.resnet18(num_classes=10)
    result = export_model(plain, tmp_path / "plain.onnx", "onnx", input_size=(32, 32))
    assert result.dynopools == 0 and result.freeze_max_abs_diff is None and result.max_abs_diff <= 1e-4


def test_missing_extra_names_the_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match=r"onnx export needs onnxruntime: pip install 'dynoswap\[export\]'"):
        export_model(moved("resnet18"), tmp_path / "m.onnx", "onnx")
    result = CliRunner().invoke(app, ["export", "resnet18", "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: onnx export needs onnxruntime: pip install 'dynoswap[export]'"]
    assert not (tmp_path / "m.onnx").exists()


# -- unfrozen models under torch.export -------------------------------------------------
def test_torch_export_of_an_unfrozen_converted_resnet18():
    gm = copy.deepcopy(moved("resnet18"))
    x = torch.randn(2, 3, 64, 56)
    program = torch.export.export(gm, (x,))
    module = program.module()
    with torch.no_grad():
        torch.testing.assert_close(module(x), gm(x), rtol=0, atol=1e-5)
    # The cell counts are symbolic, read from the alphas at run time: new alphas, new sizes, same as eager.
    moved_alphas = {}
    for i, (name, param) in enumerate(p for p in module.named_parameters() if p[0].endswith(".alpha")):
        moved_alphas[name] = torch.tensor([0.8 + 0.35 * i, 2.1 - 0.3 * i])
        with torch.no_grad():
            param.copy_(moved_alphas[name])
    gm.load_state_dict(moved_alphas, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(module(x), gm(x), rtol=0, atol=1e-5)
    assert len(moved_alphas) == 4


# -- CLI --------------------------------------------------------------------------------
def test_cli_exports_a_saved_model_with_json(tmp_path):
    source = dynoswap.ModelSource("torchvision", "resnet18", {"num_classes": 10})
    gm, _ = dynoswap.convert(torchvision.models.resnet18(num_classes=10), (48, 40), source=source)
    for i, m in enumerate(m for m in gm.modules() if isinstance(m, DynOPool2d) and m.leader is m):
        m.set_scale((0.45 + 0.25 * i, 1.2 - 0.2 * i))
    dynoswap.save(gm, tmp_path / "saved")
    out = tmp_path / "model.pt2"
    runner = CliRunner()
    saved = str(tmp_path / "saved")
    result = runner.invoke(app, ["export", saved, "-f", "pt2", "-o", str(out), "--batch", "3", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["input_size"] == [48, 40] and data["batch"] == 3 and data["format"] == "pt2"
    assert data["max_abs_diff"] <= 1e-4 and data["dynopools"] == 7 and out.is_file()
    again = runner.invoke(app, ["export", saved, "-f", "pt2", "-o", str(out)])
    assert again.exit_code == 2 and "already holds a dynoswap pt2 export; pass --force" in again.stderr
    onnx_out = str(tmp_path / "m.onnx")
    human = runner.invoke(app, ["export", saved, "-f", "onnx", "-o", onnx_out, "--input-size", "40", "48"])
    assert human.exit_code == 0, human.output
    assert "verified with onnxruntime (batch 1): max abs diff" in human.stdout and "40x48" in human.stdout


def test_cli_rejects_an_unknown_format(tmp_path):
    result = CliRunner().invoke(app, ["export", "resnet18", "-f", "tflite", "-o", str(tmp_path / "m")])
    assert result.exit_code == 2 and "--format must be one of onnx, pt2" in result.stderr


def test_a_frozen_size_mismatch_is_bad_usage_for_the_cli():
    from dynoswap.cli.common import EXIT_USAGE, exit_code_of

    assert exit_code_of(FrozenSizeError("frozen at (64, 56)")) == EXIT_USAGE
    assert exit_code_of(ExportError("does not match")) == 1


def test_exported_files_have_no_batch_norm_and_onnx_runtime_fuses_one_itself(tmp_path):
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    path = tmp_path / "folded.onnx"
    export_model(moved("resnet18"), path, "onnx")  # exports fold batch norm into the convs
    assert not [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    # A file that does hold Conv -> BatchNormalization: ONNX Runtime's basic optimisation folds it.
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((4, 3, 3, 3)), "scale": rng.uniform(0.5, 2, 4), "bias": rng.standard_normal(4)}
    weights.update(mean=rng.standard_normal(4), var=rng.uniform(0.5, 2, 4))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["y"]),
        ],
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    plain = tmp_path / "conv_bn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), str(plain))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ort.InferenceSession(str(plain), options, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node] == ["Conv"]
