"""The CLI end to end: real commands through typer's CliRunner, golden tables, JSON schema, error paths."""

from __future__ import annotations

import difflib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dynoswap.cli import app, build_app

GOLDEN = Path(__file__).parent / "golden"
# A fixed console width and no colour keep the rich tables byte-stable.
ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
SMALL = ["resnet18", "--input-size", "64", "64", "--num-classes", "10"]

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args], env=ENV)


def compare_golden(path: Path, text: str, regen: bool) -> None:
    """Compare ``text`` with a golden file; ``regen`` rewrites the file, prints the diff and fails.

    Only the explicit ``--regen-golden`` flag rewrites (no environment variable), and a rewriting
    run never passes: the diff is for review, and the next run without the flag is the check.
    """
    old = path.read_text() if path.exists() else ""
    diff = "".join(difflib.unified_diff(old.splitlines(True), text.splitlines(True), f"{path.name} (golden)", "now"))
    if regen:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        pytest.fail(
            f"--regen-golden rewrote {path.name}; review the diff, commit it, run again without the flag:\n"
            + (diff or "(no change)\n"),
            pytrace=False,
        )
    assert path.exists(), f"{path} missing: run pytest {__file__} --regen-golden"
    assert text == old, f"output differs from {path.name}:\n{diff}"


def check_golden(request: pytest.FixtureRequest, name: str, text: str) -> None:
    compare_golden(GOLDEN / name, text, bool(request.config.getoption("--regen-golden", default=False)))


def test_golden_files_are_rewritten_only_by_the_flag_and_the_run_fails(tmp_path, monkeypatch):
    path = tmp_path / "table.txt"
    path.write_text("a\nold\n")
    monkeypatch.setenv("DYNOSWAP_REGEN_GOLDEN", "1")  # no longer a way to regenerate
    with pytest.raises(AssertionError, match="output differs"):
        compare_golden(path, "a\nnew\n", regen=False)
    assert path.read_text() == "a\nold\n"
    with pytest.raises(pytest.fail.Exception) as failed:
        compare_golden(path, "a\nnew\n", regen=True)
    assert "-old\n+new" in str(failed.value) and path.read_text() == "a\nnew\n"
    with pytest.raises(pytest.fail.Exception, match="no change"):
        compare_golden(path, "a\nnew\n", regen=True)
    compare_golden(path, "a\nnew\n", regen=False)


def error_line(result) -> str:
    """The one error line on stderr (and assert there is no traceback)."""
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- JSON schema --------------------------------------------------------------
SUMMARY_KEYS = {"model", "source", "input_size", "gmacs", "params", "stages", "dynopools"}
POOL_KEYS = {"name", "alpha", "scale", "in", "out", "group"}


def assert_pair(value, kind) -> None:
    assert isinstance(value, list) and len(value) == 2 and all(isinstance(v, kind) for v in value), value


def assert_summary_schema(data: dict) -> None:
    assert SUMMARY_KEYS <= set(data)
    assert isinstance(data["model"], str)
    assert data["source"] in ("torchvision", "timm", "dynoswap", "user", "saved")
    assert_pair(data["input_size"], int)
    assert isinstance(data["gmacs"], float) and data["gmacs"] > 0
    assert isinstance(data["params"], int) and data["params"] > 0
    assert data["stages"][0] == data["input_size"]
    for stage in data["stages"]:
        assert_pair(stage, int)
    for pool in data["dynopools"]:
        assert set(pool) == POOL_KEYS
        assert isinstance(pool["name"], str) and isinstance(pool["group"], str)
        for key, kind in (("alpha", float), ("scale", float), ("in", int), ("out", int)):
            assert_pair(pool[key], kind)
        assert pool["alpha"] == pytest.approx([1 / r for r in pool["scale"]])


@pytest.fixture(scope="module")
def convert_json() -> dict:
    result = invoke("convert", *SMALL, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # the whole of stdout is one JSON object


def test_convert_json_schema(convert_json):
    data = convert_json
    assert_summary_schema(data)
    assert_summary_schema(data["before"])
    assert_summary_schema(data["after"])
    assert data["before"]["dynopools"] == []
    assert data["dynopools"] == data["after"]["dynopools"]
    assert data["model"] == "resnet18" and data["source"] == "torchvision" and data["input_size"] == [64, 64]
    # resnet18 at 64: stem conv+maxpool merged into one DynOPool (r = 0.25), three tied stride-2 stages.
    assert data["before"]["stages"] == [[64, 64], [16, 16], [8, 8], [4, 4], [2, 2]]
    assert data["after"]["stages"] == data["before"]["stages"]
    assert len(data["replacements"]) == 7 and len(data["dynopools"]) == 7
    assert data["dynopools"][0]["scale"] == [0.25, 0.25]
    assert data["dynopools"][0]["in"] == [64, 64] and data["dynopools"][0]["out"] == [16, 16]
    groups = {p["group"] for p in data["dynopools"]}
    assert len(groups) == 4  # main branch and shortcut share one alpha per stage
    assert data["params"] == data["before"]["params"] + 2 * 4  # one (2,) alpha per tie group
    assert [s["name"] for s in data["skipped"]] == ["avgpool"]
    assert data["output"] is None


# Goldens are a terminal of 80 columns, and a pipe (no COLUMNS: no width limit, one record per line).
AT_80 = {**ENV, "COLUMNS": "80"}
PIPED = {k: v for k, v in ENV.items() if k != "COLUMNS"}


def test_convert_table_golden(request):
    result = runner.invoke(app, ["convert", *SMALL], env=AT_80)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    check_golden(request, "convert_resnet18_64.txt", result.stdout)


def test_convert_table_golden_piped(request, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    result = runner.invoke(app, ["convert", *SMALL], env=PIPED)
    assert result.exit_code == 0, result.output
    assert "layer2.0.downsample.0" in result.stdout and "…" not in result.stdout  # nothing shortened or folded
    check_golden(request, "convert_resnet18_64_piped.txt", result.stdout)


def test_inspect_table_golden(request):
    result = runner.invoke(app, ["inspect", *SMALL, "--depth", "1"], env=AT_80)
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    check_golden(request, "inspect_resnet18_64.txt", result.stdout)


def test_inspect_json_matches_convert_before(convert_json):
    result = invoke("inspect", *SMALL, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert_summary_schema(data)
    assert data == convert_json["before"]


def test_inspect_depth_rows_sum_to_total():
    result = invoke(
        "inspect", "timm:resnet18", "--input-size", "64", "48", "--num-classes", "10", "--json", "--depth", "1"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["source"] == "timm" and data["input_size"] == [64, 48]
    layers = {row["name"]: row for row in data["layers"]}
    assert layers["layer1"]["out_shape"] == [1, 64, 16, 12]
    assert layers["fc"]["out_shape"] == [1, 10]
    assert sum(row["gmacs"] for row in data["layers"]) == pytest.approx(data["gmacs"], rel=1e-6)


# -- list and help ------------------------------------------------------------
def test_list_pattern_and_source():
    result = invoke("list", "resnet1?", "--source", "tv")
    assert result.exit_code == 0
    assert result.stdout == "tv:resnet18\n"
    both = invoke("list", "resnet18")
    assert both.stdout.splitlines() == ["tv:resnet18", "timm:resnet18"]
    none = invoke("list", "no_such_model_*")
    assert none.exit_code == 1 and none.stdout == ""
    bad = invoke("list", "x", "--source", "keras")
    assert bad.exit_code == 2 and "unknown source" in error_line(bad)


def test_python_m_dynoswap_help():
    proc = subprocess.run(
        [sys.executable, "-m", "dynoswap", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("convert", "inspect", "list"):
        assert command in proc.stdout


def test_missing_command_module_is_skipped_but_broken_one_raises(monkeypatch):
    app2 = build_app(("list", "no_such_command"))
    assert [c.name for c in app2.registered_commands] == ["list"]
    import importlib

    real = importlib.import_module

    def broken(name, *args):
        if name.endswith(".list"):
            raise ModuleNotFoundError("No module named 'missing_dependency'", name="missing_dependency")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="missing_dependency"):
        build_app(("list",))


# -- error paths --------------------------------------------------------------
def test_unknown_model_suggests_and_exits_2():
    result = invoke("convert", "resnet5o")
    assert result.exit_code == 2
    line = error_line(result)
    assert "unknown model 'resnet5o'" in line and "tv:resnet50" in line and "timm:" in line
    assert result.stdout == ""


def test_debug_shows_the_exception():
    from dynoswap.models import ModelError

    result = invoke("inspect", "resnet5o", "--debug")
    assert isinstance(result.exception, ModelError)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "16x16,8xeight"], "'8xeight' is not a size"),
        (["--sizes", ","], "--sizes is empty"),
        (["--input-size", "0", "64"], "--input-size must be positive integers, got 0 64"),
        (["--placement", "middle"], "--placement must be one of post, pre"),
        (["--override", "conv1"], "must look like NODE=R"),
        (["--override", "conv1=-2"], "not a scale factor"),
        (["--init-scale", "0"], "--init-scale must be a finite number > 0"),
        (["--init-scale", "nan"], "--init-scale must be a finite number > 0"),
        (["--sizes", "1x1,8x8,4x4,2x2,2x2"], "'1x1' cannot be hit exactly"),
        (["--sizes", "32x32,16x16"], "sizes has 2 entries"),
        (["--override", "conv1=nan"], "not a scale factor"),
        (["--preset", "resnet50-imagenet-q"], "did you mean resnet50-imagenet-s"),
        (["--model-kwargs", "noequals"], "must look like KEY=VALUE"),
    ],
)
def test_bad_usage_exits_2(args, message):
    result = invoke("convert", "resnet18", *args)
    assert result.exit_code == 2, result.output
    assert message in error_line(result)


def test_wrong_number_of_sizes_is_bad_usage():
    # The README's contract: bad usage exits 2 (a count that cannot match the tie groups is usage, not a failure).
    result = invoke("convert", *SMALL, "--sizes", "16x16,8x8")
    assert result.exit_code == 2, result.output
    assert "sizes has 2 entries but the model has 4 tie groups" in error_line(result)


class WritesMarker:
    """Unpickling this would create ``marker``: the code a weights-only load must never run."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": {"fc.bias": torch.zeros(10)}, "payload": WritesMarker(marker)}, ckpt)
    result = invoke("convert", *SMALL, "--weights", ckpt)
    assert result.exit_code == 1
    assert "contains pickled code" in error_line(result)
    assert not marker.exists()


def test_refusal_of_a_plain_pickle_is_the_only_line_on_stderr(tmp_path):
    import pickle

    marker = tmp_path / "marker"
    ckpt = tmp_path / "evil.pkl"
    ckpt.write_bytes(pickle.dumps({"fc.bias": WritesMarker(marker)}, protocol=4))  # torch warns about protocol 4
    # A real process: in-process runners route warnings to pytest instead of stderr.
    proc = subprocess.run(
        [sys.executable, "-m", "dynoswap", "convert", *SMALL, "--weights", str(ckpt)],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refused") and "pickled code" in lines[0], proc.stderr
    assert not marker.exists()


def test_key_mismatch_table_and_exit_1(tmp_path):
    from dynoswap.models import build_model

    state = build_model("torchvision", "resnet18", {"num_classes": 10}).state_dict()
    state.pop("fc.bias")
    state["extra.weight"] = torch.zeros(3)
    ckpt = tmp_path / "ckpt.pth"
    torch.save(state, ckpt)
    result = invoke("inspect", *SMALL, "--weights", ckpt)
    assert result.exit_code == 1
    assert "1 missing, 1 unexpected" in error_line(result)
    assert "fc.bias" in result.stderr and "extra.weight" in result.stderr  # the table
    allowed = invoke("inspect", *SMALL, "--weights", ckpt, "--allow-missing", "--json")
    assert allowed.exit_code == 0, allowed.output
    assert json.loads(allowed.stdout)["checkpoint"] == {"missing": ["fc.bias"], "unexpected": ["extra.weight"]}


def test_existing_foreign_output_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("convert", *SMALL, "-o", out)
    assert result.exit_code == 2
    assert "holds a folder with 1 entry (keep.txt), not a dynoswap saved model" in error_line(result)
    assert (out / "keep.txt").read_text() == "mine"


def test_plot_without_matplotlib_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    result = invoke("inspect", *SMALL, "--plot", "stages.png")
    assert result.exit_code == 1
    assert "--plot needs matplotlib" in error_line(result)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "stages.png"
    result = invoke("inspect", *SMALL, "--plot", png)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- presets and saving -------------------------------------------------------
def test_config_first_init_scale_becomes_an_override(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "convert:\n  input_size: [64, 64]\n  num_classes: 10\n  init_scale: 0.5\n  first_init_scale: 0.8\n"
    )
    result = invoke("convert", "resnet18", "--config", config, "--json")
    assert result.exit_code == 0, result.output
    scales = [p["scale"] for p in json.loads(result.stdout)["dynopools"]]
    assert scales[0] == pytest.approx([0.8, 0.8])
    assert all(s == pytest.approx([0.5, 0.5]) for s in scales[1:])


def test_round_trip_weights_through_convert_and_load(tmp_path):
    from dynoswap.io import saving
    from dynoswap.models import build_model

    torch.manual_seed(3)
    original = build_model("torchvision", "resnet18", {"num_classes": 10}).eval()
    state = {f"module.{k}": v for k, v in original.state_dict().items()}
    ckpt = tmp_path / "ddp.pth"
    torch.save({"state_dict": state, "epoch": 7}, ckpt)
    out = tmp_path / "patched"
    result = invoke("convert", *SMALL, "--weights", ckpt, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"] == str(out)

    loaded = saving.load(out)
    got = loaded.state_dict()
    weights = {k: v for k, v in original.state_dict().items() if k in got}
    assert len(weights) == len(original.state_dict())  # every original tensor kept its name
    for key, value in weights.items():
        assert torch.equal(got[key], value), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        # DynOPool at init = the original resizers only up to interpolation: compare shapes, weights exactly.
        assert loaded.eval()(x).shape == (2, 10)

    inspected = invoke("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.output
    data = json.loads(inspected.stdout)
    assert data["source"] == "saved" and data["input_size"] == [64, 64]
    assert len(data["dynopools"]) == 7

    twice = invoke("convert", out)
    assert twice.exit_code == 2 and "already a converted dynoswap model" in error_line(twice)

    again = invoke("convert", *SMALL, "--weights", ckpt, "-o", out, "--force", "--json")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.pth", "patched"]  # no temporaries left


def test_sizes_and_overrides_reach_the_conversion():
    sized = invoke("convert", *SMALL, "--sizes", "20x18,10x9,5x5,3x2", "--json")
    assert sized.exit_code == 0, sized.output
    data = json.loads(sized.stdout)
    assert data["stages"] == [[64, 64], [20, 18], [10, 9], [5, 5], [3, 2]]
    assert data["before"]["stages"] == [[64, 64], [16, 16], [8, 8], [4, 4], [2, 2]]
    over = invoke("convert", *SMALL, "--override", "layer2.0.conv1=0.6x0.4", "--json")
    assert over.exit_code == 0, over.output
    pools = {p["name"]: p for p in json.loads(over.stdout)["dynopools"]}
    # The shortcut is tied to the main branch: it follows the override.
    for name in ("layer2.0.conv1_dynopool", "layer2.0.downsample.0_dynopool"):
        assert pools[name]["scale"] == pytest.approx([0.6, 0.4])
        assert pools[name]["out"] == [10, 6]  # round(16 * 0.6), round(16 * 0.4)
