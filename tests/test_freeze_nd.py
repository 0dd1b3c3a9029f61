"""Freezing and exporting 1-D and 3-D models: linear / trilinear interpolation + pool, equal to eager."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynoswap import DynOPool1d, DynOPool3d
from dynoswap.errors import ExportError, FrozenSizeError, RecipeError
from dynoswap.export import FROZEN_KEY, export_model, freeze, lookup_format, refreeze
from dynoswap.export.freeze import check_input_size

POOLS = {1: DynOPool1d, 3: DynOPool3d}
CONVS = {1: nn.Conv1d, 3: nn.Conv3d}
MAX_OPS = {1: F.max_pool1d, 3: F.max_pool3d}
SIZES = {1: (32,), 3: (8, 16, 12)}  # even after two halvings


class Tiny(nn.Module):
    """conv, DynOPool, conv, DynOPool tied to the first, conv, DynOPool of its own, global mean, linear."""

    def __init__(self, ndim: int, scale=0.5, aggregate: str = "max") -> None:
        super().__init__()
        conv, pool = CONVS[ndim], POOLS[ndim]
        self.conv1 = conv(2, 4, 3, padding=1)
        self.pool1 = pool(scale, aggregate)
        self.conv2 = conv(4, 4, 3, padding=1)
        self.pool2 = pool(scale, aggregate)
        self.pool2.tie_to(self.pool1)
        self.conv3 = conv(4, 5, 3, padding=1)
        self.pool3 = pool(0.8, aggregate)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        x = self.pool2(torch.relu(self.conv2(self.pool1(torch.relu(self.conv1(x))))))
        x = self.pool3(torch.relu(self.conv3(x)))
        return self.head(x.flatten(2).mean(2))


def _calls(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in (torch.relu,)]


@pytest.mark.parametrize("ndim", [1, 3])
def test_half_scale_on_even_sizes_is_exactly_max_pool(seeded, ndim):
    model = Tiny(ndim).eval()
    frozen = freeze(model, SIZES[ndim])
    ops = _calls(frozen)
    assert ops[0] is check_input_size
    # pool1 and pool2 (r = 1/2 on even sizes) are bare pools; pool3 (r = 0.8) interpolates first.
    assert [op for op in ops if op in (MAX_OPS[ndim], F.interpolate)] == [MAX_OPS[ndim]] * 2 + [
        F.interpolate,
        MAX_OPS[ndim],
    ]
    modes = [n.kwargs["mode"] for n in frozen.graph.nodes if n.target is F.interpolate]
    assert modes == ["linear" if ndim == 1 else "trilinear"]
    x = torch.randn(2, 2, *SIZES[ndim])
    with torch.no_grad():
        assert torch.equal(frozen(x), model(x))


@pytest.mark.parametrize("ndim", [1, 3])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_frozen_equals_eager_with_each_tie_group_moved(seeded, ndim, aggregate):
    model = Tiny(ndim, aggregate=aggregate).eval()
    x = torch.randn(2, 2, *SIZES[ndim])
    moves = {1: [(0.37,), (1.6,)], 3: [(0.37, 0.6, 1.3), (1.4, 0.45, 0.7)]}[ndim]
    for group in (model.pool1, model.pool3):
        for scale in moves:
            group.set_scale(scale)
            assert model.pool2.scale == model.pool1.scale  # the follower moves with its leader
            with torch.no_grad():
                expected = model(x)
                torch.testing.assert_close(freeze(model, SIZES[ndim])(x), expected, rtol=0, atol=1e-6)
                torch.testing.assert_close(freeze(model)(x), expected, rtol=0, atol=1e-6)
            group.set_scale(0.5 if group is model.pool1 else 0.8)


@pytest.mark.parametrize("ndim", [1, 3])
def test_ratio_contract_serves_other_sizes_and_fixed_refuses_them(seeded, ndim):
    model = Tiny(ndim, scale=0.6).eval()
    other = {1: (23,), 3: (5, 9, 17)}[ndim]
    x = torch.randn(1, 2, *other)
    with torch.no_grad():
        torch.testing.assert_close(freeze(model)(x), model(x), rtol=0, atol=1e-6)
    shown = ", ".join(map(str, SIZES[ndim]))
    with pytest.raises(FrozenSizeError, match=rf"takes \(N, C, {shown}\) inputs"):
        freeze(model, SIZES[ndim])(x)
    freeze(model, SIZES[ndim])(torch.randn(3, 2, *SIZES[ndim]))  # another batch is fine


@pytest.mark.parametrize("ndim", [1, 3])
@pytest.mark.parametrize("input_size", ["fixed", "ratio"])
def test_refreeze_from_the_json_record_rebuilds_the_same_model(seeded, ndim, input_size):
    model = Tiny(ndim, scale=(0.45,) * ndim).eval()
    frozen = freeze(model, SIZES[ndim] if input_size == "fixed" else None)
    record = json.loads(json.dumps(frozen.meta["dynoswap"][FROZEN_KEY]))
    assert [p["name"] for p in record["pools"]] == ["pool1", "pool2", "pool3"]
    assert [len(p["alpha"]) for p in record["pools"]] == [ndim] * 3
    assert record["pools"][0]["alpha"] == record["pools"][1]["alpha"]  # tied
    fresh = Tiny(ndim).eval()  # other alphas: the rebuild reads the record only
    rebuilt = refreeze(fresh, record)
    rebuilt.load_state_dict(frozen.state_dict(), strict=True)
    assert rebuilt.code == frozen.code
    x = torch.randn(2, 2, *SIZES[ndim])
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), frozen(x))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda r: r["pools"][0].update(alpha=[2.0, 2.0]), "alpha and sizes have different lengths"),
        (lambda r: r["pools"][0].update(alpha=[2.0, 2.0, 2.0, 2.0]), "malformed"),
        (lambda r: r["pools"][0].update(out_size=[]), "malformed"),
        (lambda r: r.update(channels_last=True, version=2, folded=[]), "channels_last must only freeze 2-D layers"),
    ],
)
def test_malformed_nd_record_is_a_recipe_error(corrupt, message):
    model = Tiny(3).eval()
    record = json.loads(json.dumps(freeze(model, SIZES[3]).meta["dynoswap"][FROZEN_KEY]))
    corrupt(record)
    with pytest.raises(RecipeError, match=message):
        refreeze(model, record)


def test_channels_last_is_refused_for_a_3d_model():
    with pytest.raises(ExportError, match="channels_last is for 2-D models"):
        freeze(Tiny(3).eval(), SIZES[3], channels_last=True)


class One(nn.Module):
    def __init__(self, ndim: int, scale, aggregate: str) -> None:
        super().__init__()
        self.pool = POOLS[ndim](scale, aggregate)

    def forward(self, x):
        return self.pool(x)


@settings(max_examples=30, deadline=None)
@given(
    ndim=st.sampled_from([1, 3]),
    sizes=st.lists(st.integers(1, 12), min_size=3, max_size=3),
    rates=st.lists(st.floats(min_value=0.1, max_value=3.0, allow_nan=False), min_size=3, max_size=3),
    aggregate=st.sampled_from(["max", "mean"]),
)
def test_freeze_matches_the_layer_at_any_size_and_scale(ndim, sizes, rates, aggregate):
    torch.manual_seed(0)
    model = One(ndim, rates[:ndim], aggregate).eval()
    x = torch.randn(1, 2, *sizes[:ndim])
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(freeze(model, sizes[:ndim])(x), expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(freeze(model)(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
@pytest.mark.parametrize("ndim", [1, 3])
def test_export_is_verified_against_eager(tmp_path, seeded, fmt, ndim):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    model = Tiny(ndim, scale=(0.45,) * ndim).eval()
    path = tmp_path / f"tiny{ndim}d.{fmt}"
    result = export_model(model, path, fmt, input_size=SIZES[ndim], dynamic_batch=True)
    assert result.input_size == SIZES[ndim] and result.dynopools == 3
    assert result.max_abs_diff <= 1e-4 and result.freeze_max_abs_diff is not None
    assert result.freeze_max_abs_diff <= 1e-6
    x = torch.randn(3, 2, *SIZES[ndim])
    with torch.no_grad():
        expected = model(x)
    if fmt == "onnx":
        got = lookup_format("onnx").run(path, [x])[0][0]
    else:
        got = torch.export.load(str(path)).module()(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("ndim", [1, 3])
def test_folded_freeze_folds_the_batch_norms_of_the_models_dimension(seeded, ndim):
    conv, norm = CONVS[ndim], {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[ndim]
    model = nn.Sequential(conv(2, 4, 3, padding=1), norm(4), nn.ReLU(), POOLS[ndim](0.6), conv(4, 3, 1), norm(3))
    with torch.no_grad():
        for m in model:
            if isinstance(m, norm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    model.eval()
    frozen = freeze(model, SIZES[ndim], fold_bn=True)
    assert [list(p) for p in frozen.meta["dynoswap"][FROZEN_KEY]["folded"]] == [["0", "1"], ["4", "5"]]
    assert not any(isinstance(m, norm) for m in frozen.modules())
    x = torch.randn(2, 2, *SIZES[ndim])
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), rtol=0, atol=1e-5)
