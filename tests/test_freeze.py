"""freeze(): DynOPools become fixed standard ops that compute exactly what the trained layers compute."""

from __future__ import annotations

import json
import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from export_models import CASES, moved
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

import dynoswap
from dynoswap.errors import ExportError, FrozenSizeError, RecipeError
from dynoswap.export import FROZEN_KEY, freeze, is_frozen, refreeze
from dynoswap.export.freeze import check_input_size, ratio_resize_pool
from dynoswap.layers import DynOPool2d, cells, output_size

HEAVY = {"convnext_tiny", "hrnet_w18_small"}
MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in CASES]
POOL_OPS = {F.interpolate, F.max_pool2d, F.avg_pool2d, check_input_size}


def _has_dynopool(model: nn.Module) -> bool:
    return any(isinstance(m, DynOPool2d) for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_frozen_equals_unfrozen_with_every_group_moved(name):
    case, gm = CASES[name], moved(name)
    torch.manual_seed(1)
    x = torch.randn(2, 3, *case.input_size)
    with torch.no_grad():
        expected = case.output(gm(x))
    sizes = {n: m.last_out_size for n, m in gm.named_modules() if isinstance(m, DynOPool2d)}
    scales = {m.scale for m in gm.modules() if isinstance(m, DynOPool2d)}
    assert any(r > 1 for s in scales for r in s) and any(r < 1 for s in scales for r in s)

    frozen = freeze(gm, case.input_size)
    assert not _has_dynopool(frozen) and _has_dynopool(gm)
    assert not [n for n, _ in frozen.named_parameters() if "alpha" in n]
    # Every other weight keeps its key and value.
    kept = {k: v for k, v in gm.state_dict().items() if not k.endswith(".alpha")}
    assert sorted(frozen.state_dict()) == sorted(kept)  # the same keys (a two-mode model lists them in graph order)
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in kept.items())
    with torch.no_grad():
        torch.testing.assert_close(case.output(frozen(x)), expected, rtol=0, atol=1e-6)
    # The record holds each layer's size at the input size, as the layer itself produced it.
    record = frozen.meta["dynoswap"][FROZEN_KEY]
    assert record["mode"] == "fixed" and record["input_size"] == list(case.input_size)
    assert {p["name"]: tuple(p["out_size"]) for p in record["pools"]} == sizes
    # Only integer sizes, never a float scale_factor: one interpolation per layer that is not a plain pool.
    resampling = [p for p in record["pools"] if [2 * v for v in p["out_size"]] != p["in_size"]]
    constant = [n for n in frozen.graph.nodes if n.target is F.interpolate and isinstance(n.kwargs["size"], tuple)]
    assert len(constant) == len(resampling) > 0
    assert all(type(v) is int for n in constant for v in n.kwargs["size"])
    assert all(n.kwargs.get("scale_factor") is None for n in frozen.graph.nodes if n.target is F.interpolate)


@pytest.mark.parametrize("name", ["resnet18", "deeplabv3_mobilenet_v3_large"])
def test_ratio_contract_serves_other_input_sizes(name):
    case, gm = CASES[name], moved(name)
    frozen = freeze(gm)
    assert frozen.meta["dynoswap"][FROZEN_KEY]["mode"] == "ratio"
    assert not _has_dynopool(frozen) and not [n for n, _ in frozen.named_parameters() if "alpha" in n]
    h, w = case.input_size
    for size in [case.input_size, (h + 13, w - 7), (37, 41)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(case.output(frozen(x)), case.output(gm(x)), rtol=0, atol=1e-6)


def test_fixed_contract_refuses_another_input_size_but_not_another_batch():
    gm = moved("resnet18")
    frozen = freeze(gm, (64, 56))
    with torch.no_grad():
        assert frozen(torch.randn(3, 3, 64, 56)).shape == (3, 10)
        for shape in [(1, 3, 64, 64), (1, 3, 56, 64), (3, 64, 56)]:
            with pytest.raises(FrozenSizeError, match=r"takes \(N, C, 64, 56\) inputs"):
                frozen(torch.randn(*shape))
    assert issubclass(FrozenSizeError, ValueError)


class _Tiny(nn.Module):
    def __init__(self, scale, aggregate="max") -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = DynOPool2d(scale, aggregate=aggregate)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.head(self.pool(self.conv(x)))


def test_half_scale_on_even_sizes_is_exactly_max_pool():
    frozen = freeze(_Tiny(0.5), (12, 10))  # a plain module is traced with DynOPool2d as a leaf
    targets = [n.target for n in frozen.graph.nodes if n.op == "call_function"]
    assert targets == [check_input_size, F.max_pool2d]
    odd = freeze(_Tiny(0.5), (13, 10))  # 13 rows -> 7 cells: no longer a plain pool
    assert [n.target for n in odd.graph.nodes if n.op == "call_function"][1:] == [F.interpolate, F.max_pool2d]


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("scale", [0.5, (0.37, 1.6), (2.0, 0.5)])
def test_small_model_both_aggregates(seeded, aggregate, scale):
    model = _Tiny(scale, aggregate).eval()
    x = torch.randn(2, 3, 14, 11)
    frozen = freeze(model, (14, 11))
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(freeze(model)(x[..., :9]), model(x[..., :9]), rtol=0, atol=1e-6)
    pools = frozen.meta["dynoswap"][FROZEN_KEY]["pools"]
    assert [p["aggregate"] for p in pools] == [aggregate]


def test_channels_last_and_float64_models(seeded):
    model = _Tiny((0.6, 1.3)).eval()
    x = torch.randn(2, 3, 15, 12).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(freeze(model, (15, 12))(x), model(x), rtol=0, atol=1e-6)
        wide = model.double()
        wide.pool.set_scale((0.6, 1.3))
        frozen = freeze(wide, (15, 12))
        assert frozen.meta["dynoswap"][FROZEN_KEY]["pools"][0]["precision"] == "float64"
        torch.testing.assert_close(frozen(x.double()), wide(x.double()), rtol=0, atol=1e-12)


def test_freeze_leaves_the_model_alone_and_is_not_frozen_twice():
    gm = moved("resnet18")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    frozen = freeze(gm, (64, 56))
    assert _has_dynopool(gm) and FROZEN_KEY not in gm.meta.get("dynoswap", {})
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    assert is_frozen(frozen) and not is_frozen(gm)
    assert dynoswap.freeze is freeze
    # A frozen model has nothing left to freeze: freezing again is the same graph.
    again = freeze(frozen, (64, 56))
    assert again.meta["dynoswap"][FROZEN_KEY]["pools"] == []


def test_model_that_does_not_run_at_the_size_is_an_export_error():
    with pytest.raises(ExportError, match="does not run at input size"):
        freeze(nn.Sequential(nn.Conv2d(3, 4, 5), DynOPool2d(0.5)), (3, 3))  # a 5x5 kernel on 3x3


def test_training_a_frozen_model_is_plain_training(seeded):
    frozen = freeze(moved("resnet18"), (64, 56)).train()
    opt = torch.optim.SGD(frozen.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 64, 56), torch.tensor([0, 1, 2, 3])
    before = frozen.fc.weight.detach().clone()
    F.cross_entropy(frozen(x), y).backward()
    assert all(p.grad is not None for p in frozen.parameters())
    opt.step()
    assert not torch.equal(before, frozen.fc.weight)


# -- the record and the rebuild ---------------------------------------------------------
def _json(data):
    return json.loads(json.dumps(data))


@pytest.mark.parametrize("input_size", [(64, 56), None])
def test_refreeze_from_the_json_record_rebuilds_the_same_model(input_size):
    gm = moved("resnet18")
    frozen = freeze(gm, input_size)
    record = _json(frozen.meta["dynoswap"][FROZEN_KEY])
    fresh, _ = dynoswap.convert(torchvision.models.resnet18(num_classes=10), (64, 56), check=False)
    # The rebuild reads sizes and ratios from the record, never the (untrained) alphas.
    rebuilt = refreeze(fresh, record)
    rebuilt.load_state_dict(frozen.state_dict(), strict=True)
    assert rebuilt.code == frozen.code
    x = torch.randn(2, 3, 64, 56)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), frozen(x))
    assert _json(rebuilt.meta["dynoswap"][FROZEN_KEY]) == record


def _record():
    return _json(freeze(moved("resnet18"), (64, 56)).meta["dynoswap"][FROZEN_KEY])


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda r: r.update(version=99), "version 99 is not supported"),
        (lambda r: r.update(mode="stretchy"), "frozen mode must be one of"),
        (lambda r: r.update(pools="all"), "no list of pools"),
        (lambda r: r.update(input_size=[64.5, 56]), "input_size is malformed"),
        (lambda r: r["pools"].pop(), "it was frozen from another conversion"),
        (lambda r: r["pools"][0].update(name="fc"), "it was frozen from another conversion"),
        (lambda r: r["pools"][1].update(alpha=[float("nan"), 1.0]), "alpha must be finite and at least 0.125"),
        (lambda r: r["pools"][1].update(alpha=[-2.0, 1.0]), "alpha must be finite and at least 0.125"),
        (lambda r: r["pools"][1].update(out_size=[0, 3]), "sizes must be positive"),
        (lambda r: r["pools"][1].update(out_size=["3", 3]), "malformed"),
        (lambda r: r["pools"][1].update(aggregate="median"), "unknown aggregate"),
        (lambda r: r["pools"][1].pop("precision"), "malformed"),
        (lambda r: r["pools"][1].update(in_size=None), "needs input_size and every layer's"),
    ],
)
def test_malformed_record_is_a_recipe_error(corrupt, message):
    record = _record()
    corrupt(record)
    with pytest.raises(RecipeError, match=message):
        refreeze(moved("resnet18"), record)


def test_save_then_load_gives_identical_outputs(tmp_path):
    source = dynoswap.ModelSource("torchvision", "resnet18", {"num_classes": 10})
    gm, _ = dynoswap.convert(
        dynoswap.build_model("torchvision", "resnet18", {"num_classes": 10}), (64, 56), source=source
    )
    for i, m in enumerate(m for m in gm.modules() if isinstance(m, DynOPool2d) and m.leader is m):
        m.set_scale((0.4 + 0.3 * i, 0.9 - 0.1 * i))
    frozen = freeze(gm.eval(), (64, 56))
    dynoswap.save(frozen, tmp_path / "frozen")
    document = json.loads((tmp_path / "frozen" / "recipe.json").read_text())
    assert document["format_version"] == 2 and document["recipe"][FROZEN_KEY]["mode"] == "fixed"
    loaded = dynoswap.load(tmp_path / "frozen")
    assert is_frozen(loaded) and not any(isinstance(m, DynOPool2d) for m in loaded.modules())
    assert not [k for k in loaded.state_dict() if k.endswith("alpha")]
    x = torch.randn(2, 3, 64, 56)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), frozen(x))
    with pytest.raises(FrozenSizeError):
        loaded(torch.randn(1, 3, 64, 64))
    # A version-2 document without its frozen section is refused, naming the field.
    del document["recipe"][FROZEN_KEY]
    (tmp_path / "frozen" / "recipe.json").write_text(json.dumps(document))
    with pytest.raises(RecipeError, match="recipe.frozen"):
        dynoswap.load(tmp_path / "frozen")


# -- the size rule without tensors -------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(1, 4096),
    r=st.floats(min_value=0.01, max_value=8.0, allow_nan=False),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_python_size_rule_matches_the_layer_bit_for_bit(n, r, dtype):
    alpha = torch.tensor([1.0 / r, 1.0 / r], dtype=dtype)
    assert cells(n, alpha[0].item(), dtype) == output_size((n, n), alpha)[0]


@pytest.mark.parametrize("n", [3, 5, 7, 9, 11, 13, 15, 25, 99])
def test_python_size_rule_on_exact_halves(n):
    # n / alpha lands exactly on k + 0.5: round half up, in both precisions.
    for dtype in (torch.float32, torch.float64):
        alpha = torch.tensor([2.0, 2.0], dtype=dtype)
        assert cells(n, 2.0, dtype) == output_size((n, n), alpha)[0] == (n + 1) // 2


def test_ratio_resize_pool_follows_the_input():
    layer = DynOPool2d((0.45, 1.7)).eval()
    a_h, a_w = layer.alpha.tolist()
    for size in [(1, 1), (2, 3), (17, 9), (40, 41)]:
        x = torch.randn(1, 2, *size)
        with torch.no_grad():
            torch.testing.assert_close(ratio_resize_pool(x, (a_h, a_w), "float32", "max"), layer(x), rtol=0, atol=1e-6)


def test_frozen_graph_holds_only_standard_ops():
    frozen = freeze(moved("resnet18"), (64, 56))
    functions = {n.target for n in frozen.graph.nodes if n.op == "call_function"}
    assert functions <= POOL_OPS | {torch.flatten, operator.add}
    assert isinstance(frozen, fx.GraphModule)


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 20),
    w=st.integers(1, 20),
    r_h=st.floats(min_value=0.1, max_value=3.0, allow_nan=False),
    r_w=st.floats(min_value=0.1, max_value=3.0, allow_nan=False),
    aggregate=st.sampled_from(["max", "mean"]),
)
def test_freeze_matches_the_layer_at_any_size_and_scale(h, w, r_h, r_w, aggregate):
    torch.manual_seed(0)
    model = _Tiny((r_h, r_w), aggregate).eval()
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(freeze(model, (h, w))(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(freeze(model)(x), expected, rtol=0, atol=1e-6)


# -- deployment options: batch norm folded, channels_last ---------------------------------
def _norms(model: nn.Module) -> list[str]:
    modules = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    calls = [n.name for n in model.graph.nodes if n.target in (F.batch_norm, torch.batch_norm)]
    return modules + calls


@pytest.mark.parametrize("name", MODELS)
def test_folded_freeze_has_no_batch_norm_and_equals_the_eval_model(name):
    case, gm = CASES[name], moved(name)
    x = torch.randn(2, 3, *case.input_size)
    with torch.no_grad():
        expected = case.output(gm(x))
    frozen = freeze(gm, case.input_size, fold_bn=True).eval()
    assert not _norms(frozen)
    record = frozen.meta["dynoswap"][FROZEN_KEY]
    assert len(record.get("folded", [])) == len(_norms(gm))  # every batch norm here follows its conv
    with torch.no_grad():
        torch.testing.assert_close(case.output(frozen(x)), expected, rtol=0, atol=1e-5)
    if not _norms(gm):  # convnext: layer norms only, nothing to fold (and the record stays version 1)
        assert record["version"] == 1
        return
    assert record["version"] == 2
    # The folded conv carries the norm: bias = beta - gamma * mean / sqrt(var + eps), weight scaled.
    conv_name, norm_name = record["folded"][0]
    conv, norm = gm.get_submodule(conv_name), gm.get_submodule(norm_name)
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    folded = frozen.get_submodule(conv_name)
    torch.testing.assert_close(folded.weight, conv.weight * scale.view(-1, 1, 1, 1))
    torch.testing.assert_close(folded.bias, norm.bias - scale * norm.running_mean + scale * (conv.bias or 0))


def test_channels_last_freeze_is_exact_and_converts_its_input():
    gm = moved("resnet18")
    x = torch.randn(2, 3, 64, 56)
    with torch.no_grad():
        expected = gm(x)
        frozen = freeze(gm, (64, 56), fold_bn=True, channels_last=True).eval()
        torch.testing.assert_close(frozen(x), expected, rtol=0, atol=1e-5)
        ratio = freeze(gm, channels_last=True).eval()
        # channels_last convolutions sum in another order: float32 rounding of about 1e-6 on outputs near 1.
        torch.testing.assert_close(ratio(x), expected, rtol=0, atol=1e-5)
    weights = [m.weight for m in frozen.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert frozen.meta["dynoswap"][FROZEN_KEY]["channels_last"] is True
    # Without deployment options the record stays version 1, as before.
    assert freeze(gm, (64, 56)).meta["dynoswap"][FROZEN_KEY]["version"] == 1


class _SharedNorm(nn.Module):
    """A norm after an addition and a conv whose output is used twice: neither may fold."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.norm, self.norm2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.c, self.norm3 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.pool = DynOPool2d(0.6)

    def forward(self, x):
        a = self.a(x)
        y = self.norm(a + self.b(x)) + self.norm2(a)
        return self.norm3(self.c(self.pool(y)))


def test_only_a_conv_feeding_only_its_norm_folds(seeded):
    model = _SharedNorm()
    for norm in (model.norm, model.norm2, model.norm3):
        norm.running_mean.uniform_(-1, 1)
        norm.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 3, 12, 10)
    frozen = freeze(model, (12, 10), fold_bn=True)
    assert frozen.meta["dynoswap"][FROZEN_KEY]["folded"] == [["c", "norm3"]]
    assert sorted(_norms(frozen)) == ["norm", "norm2"]
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=0, atol=1e-5)


def test_folded_frozen_model_saves_and_loads(tmp_path):
    source = dynoswap.ModelSource("torchvision", "resnet18", {"num_classes": 10})
    gm, _ = dynoswap.convert(
        dynoswap.build_model("torchvision", "resnet18", {"num_classes": 10}), (64, 56), source=source
    )
    for m in gm.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    frozen = freeze(gm.eval(), (64, 56), fold_bn=True, channels_last=True)
    dynoswap.save(frozen, tmp_path / "frozen")
    loaded = dynoswap.load(tmp_path / "frozen")
    assert not _norms(loaded) and loaded.code == frozen.code
    x = torch.randn(2, 3, 64, 56)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), frozen(x))
    record = _json(frozen.meta["dynoswap"][FROZEN_KEY])
    record["folded"].append(["fc", "bn1"])
    with pytest.raises(RecipeError, match="which this model does not have"):
        refreeze(gm, record)
    record["folded"] = "all"
    with pytest.raises(RecipeError, match="list of \\[conv, norm\\] pairs"):
        refreeze(gm, record)
