"""DynOPool1d and DynOPool3d against the float64 grid_sample reference, MaxPool1d/3d and their contract."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynoswap import DynOPool1d, DynOPool2d, DynOPool3d, DynOPoolNd
from dynoswap.layers import POSITION_GRADIENTS, query_positions
from tests.layer_vs_reference import CLASSES, assert_rel_close, layer_and_reference
from tests.reference_dynopool import reference_dynopool, reference_dynopool_nd

F64 = torch.float64
MAX_POOLS = {1: nn.MaxPool1d, 3: nn.MaxPool3d}


GENERIC = [
    ((2, 3, 13), 0.5),  # odd length at r = 0.5: query points between samples
    ((1, 2, 20), 0.37),
    ((2, 2, 7), 1.7),  # upsampling
    ((1, 1, 3), 0.2),  # collapses to the 2-cell minimum
    ((2, 2, 5, 7, 9), 0.5),
    ((1, 2, 6, 11, 8), (0.37, 0.81, 0.55)),  # anisotropic
    ((1, 1, 3, 5, 4), (1.7, 0.6, 2.3)),  # upsampling on two axes
    ((2, 1, 9, 4, 6), (0.3, 1.3, 0.6)),
    ((1, 1, 2, 3, 2), 0.2),  # every axis at the floor
]


@pytest.mark.parametrize(("shape", "scale"), GENERIC)
@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("position_gradient", POSITION_GRADIENTS)
def test_matches_reference_generic(seeded, shape, scale, aggregate, position_gradient):
    x = torch.randn(shape, dtype=F64)
    (out, gx, ga), (ref, rx, ra) = layer_and_reference(x, scale, aggregate, position_gradient=position_gradient)
    assert out.shape == ref.shape
    assert_rel_close(out, ref)
    assert_rel_close(gx, rx)
    assert_rel_close(ga, ra)


# Sizes whose grid coordinates are exact in binary: query points exactly on sample centres (r = 0.5)
# or exactly halfway (r = 2), where the one-sided slope convention (towards the next sample) matters.
EXACT = [((2, 3, 16), 0.5), ((1, 2, 8), 2.0), ((1, 2, 4, 8, 16), 0.5), ((1, 1, 8, 4, 8), (0.5, 2.0, 0.5))]


@pytest.mark.parametrize(("shape", "scale"), EXACT)
def test_matches_reference_on_sample_centres(seeded, shape, scale):
    (out, gx, ga), (ref, rx, ra) = layer_and_reference(torch.randn(shape, dtype=F64), scale)
    assert_rel_close(out, ref)
    assert_rel_close(gx, rx)
    assert_rel_close(ga, ra)


@pytest.mark.parametrize("floor_gradient", ["pass", "stop"])
@pytest.mark.parametrize("shape", [(2, 2, 3), (1, 2, 3, 3, 3)])
def test_gradient_below_the_floor_passes_or_stops_as_chosen(seeded, floor_gradient, shape):
    # 3 * 0.2 = 0.6 cells: below the 1.5 floor on every axis, so 2 cells per axis either way.
    x = torch.randn(shape, dtype=F64)
    (out, gx, ga), (ref, rx, ra) = layer_and_reference(x, 0.2, "max", floor_gradient)
    assert out.shape[2:] == (2,) * (len(shape) - 2)
    assert_rel_close(out, ref)
    assert_rel_close(gx, rx)
    if floor_gradient == "stop":
        assert torch.equal(ga, torch.zeros_like(ga))
    else:
        assert bool((ga != 0).all())
        assert_rel_close(ga, ra)


def test_nd_reference_is_the_2d_reference_in_2d(seeded):
    x = torch.randn(2, 3, 13, 10, dtype=F64)
    alpha = torch.tensor([2.7, 1.6], dtype=F64)
    assert torch.equal(reference_dynopool_nd(x, alpha), reference_dynopool(x, alpha))


def tied_input(shape) -> torch.Tensor:
    """Post-ReLU integers: most windows hold ties, which MaxPool breaks by first position."""
    return torch.randint(-2, 3, shape).clamp_min(0).double()


@pytest.mark.parametrize("shape", [(4, 8, 14), (2, 3, 4, 6, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("ties", [False, True])
def test_even_input_at_half_scale_is_maxpool(seeded, shape, dtype, ties):
    x = (tied_input(shape) if ties else torch.randn(shape)).to(dtype)
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    ndim = len(shape) - 2
    out = CLASSES[ndim](0.5).to(dtype)(x)
    expected = MAX_POOLS[ndim](2)(x_ref)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    with torch.no_grad():
        assert torch.equal(CLASSES[ndim](0.5).to(dtype)(x), expected)


def _interior_centre_axes(shape: tuple[int, ...], alpha: torch.Tensor) -> set[int]:
    """Axes with a query point exactly on an interior sample centre, where the slope is one-sided.

    The layer takes the slope towards the next sample there; grid_sample's normalise/unnormalise
    round trip may land a hair below and take the other side, so the alpha gradients of those
    axes are compared only where the coordinates are exact in binary (the EXACT cases above).
    """
    axes = set()
    for axis, n in enumerate(shape):
        size = torch.tensor(float(math.floor(max(n / alpha[axis].item(), 1.5) + 0.5)), dtype=F64)
        pos = query_positions(n, size)
        if bool(((pos > 0) & (pos < n - 1) & ((pos - pos.round()).abs() < 1e-9)).any()):
            axes.add(axis)
    return axes


small = st.integers(min_value=1, max_value=9)
scales = st.floats(min_value=0.1, max_value=2.5, allow_nan=False)


@settings(max_examples=40, deadline=None)
@given(
    ndim=st.sampled_from([1, 3]),
    sizes=st.lists(small, min_size=3, max_size=3),
    rates=st.lists(scales, min_size=3, max_size=3),
    aggregate=st.sampled_from(["max", "mean"]),
    floor_gradient=st.sampled_from(["pass", "stop"]),
    position_gradient=st.sampled_from(POSITION_GRADIENTS),
    seed=st.integers(0, 2**16),
)
def test_matches_reference_for_any_size_and_scale(
    ndim, sizes, rates, aggregate, floor_gradient, position_gradient, seed
):
    torch.manual_seed(seed)
    shape = (2, 2, *sizes[:ndim])
    x = torch.randn(shape, dtype=F64)
    (out, gx, ga), (ref, rx, ra) = layer_and_reference(x, rates[:ndim], aggregate, floor_gradient, position_gradient)
    alpha = torch.tensor([1 / r for r in rates[:ndim]], dtype=F64)
    expected = tuple(math.floor(max(n / a, 1.5) + 0.5) for n, a in zip(shape[2:], alpha.tolist(), strict=True))
    assert out.shape == ref.shape == (*shape[:2], *expected)
    assert_rel_close(out, ref)
    assert_rel_close(gx, rx)
    one_sided = _interior_centre_axes(shape[2:], alpha)
    for axis in range(ndim):
        if axis not in one_sided:
            torch.testing.assert_close(ga[axis], ra[axis], rtol=1e-6, atol=1e-9 * (1 + ra.abs().max().item()))


@pytest.mark.parametrize(("shape", "alpha"), [((2, 3, 15), [2.5]), ((1, 2, 6, 15, 10), [1.5, 2.5, 1.25])])
def test_alpha_gradient_matches_finite_difference_of_relaxation(seeded, shape, alpha):
    # At alpha with integral n / alpha (4, 6 and 8 cells) the straight-through size equals the
    # continuous one, and no query point sits on a sample centre.
    ndim = len(shape) - 2
    x = torch.randn(shape, dtype=F64)
    layer = CLASSES[ndim](0.5).double()
    layer.alpha.data = torch.tensor(alpha, dtype=F64)
    weights = torch.randn_like(layer(x))
    (layer(x) * weights).sum().backward()
    eps = 1e-6
    numeric = []
    for axis in range(ndim):
        step = torch.zeros(ndim, dtype=F64)
        step[axis] = eps
        alpha = layer.alpha.detach()
        up = (reference_dynopool_nd(x, alpha + step, continuous=True) * weights).sum()
        down = (reference_dynopool_nd(x, alpha - step, continuous=True) * weights).sum()
        numeric.append((up - down).item() / (2 * eps))
    torch.testing.assert_close(layer.alpha.grad, torch.tensor(numeric, dtype=F64), rtol=1e-6, atol=1e-8)


def test_sizes_scales_and_repr():
    one, three = DynOPool1d(0.25), DynOPool3d((0.5, 0.25, 2.0))
    assert one.alpha.tolist() == [4.0] and one.scale == (0.25,)
    assert three.alpha.tolist() == [2.0, 4.0, 0.5] and three.scale == (0.5, 0.25, 2.0)
    assert one.output_size((9,)) == (2,)  # 2.25 -> 2
    assert three.output_size((9, 9, 3)) == (5, 2, 6)  # 4.5 rounds half up; 2.25 -> 2
    assert three(torch.randn(1, 2, 9, 9, 3)).shape == (1, 2, 5, 2, 6)
    assert three.last_in_size == (9, 9, 3) and three.last_out_size == (5, 2, 6)
    assert three.last_size_st.tolist() == [5.0, 2.0, 6.0]
    three.set_scale(0.5)
    assert three.scale == (0.5, 0.5, 0.5)
    assert repr(one) == "DynOPool1d(scale=(0.25,), aggregate='max')"
    assert repr(three) == "DynOPool3d(scale=(0.5, 0.5, 0.5), aggregate='max')"
    assert isinstance(one, DynOPoolNd) and isinstance(three, DynOPoolNd) and not isinstance(three, DynOPool2d)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DynOPool1d((0.5, 0.5)), r"init_scale must be a number or an \(r_l,\) sequence"),
        (lambda: DynOPool3d((0.5, 0.5)), r"init_scale must be a number or an \(r_t, r_h, r_w\) triple"),
        (lambda: DynOPool3d((0.5, 0.0, 0.5)), "scale factors must be finite and > 0"),
        (lambda: DynOPool1d().set_scale(math.nan), "scale factors must be finite and > 0"),
        (lambda: DynOPool3d(aggregate="median"), "aggregate must be one of"),
        (lambda: DynOPool1d()(torch.randn(1, 2, 8, 8)), r"DynOPool1d expects a 3D \(N, C, L\) input"),
        (lambda: DynOPool3d()(torch.randn(1, 2, 8, 8)), r"DynOPool3d expects a 5D \(N, C, T, H, W\) input"),
        (lambda: DynOPool1d()(torch.randn(1, 2, 0)), "DynOPool1d needs at least one channel and a non-empty signal"),
        (lambda: DynOPool3d()(torch.randn(1, 0, 2, 2, 2)), "non-empty volume"),
        (lambda: DynOPool3d()(torch.randn(1, 1, 4, 4, 4), in_size_st=torch.tensor([4.0, 4.0, 5.0])), "does not match"),
    ],
)
def test_bad_arguments_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_base_class_is_abstract():
    with pytest.raises(TypeError, match="DynOPoolNd is abstract"):
        DynOPoolNd()


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_alpha_raises_in_forward_and_on_load(bad):
    layer = DynOPool3d()
    with torch.no_grad():
        layer.alpha[2] = bad
    with pytest.raises(ValueError, match="DynOPool3d alpha must be finite and > 0"):
        layer(torch.randn(1, 1, 4, 4, 4))
    fresh = DynOPool1d(0.5)
    with pytest.raises(ValueError, match="DynOPool1d alpha must be finite and > 0"):
        fresh.load_state_dict({"alpha": torch.tensor([bad])})
    assert fresh.alpha.tolist() == [2.0]


def test_upsampling_beyond_the_bound_raises():
    layer = DynOPool1d()
    with torch.no_grad():
        layer.alpha[0] = 1e-6
    with pytest.raises(ValueError, match="DynOPool1d alpha asks for a .* output from a 4 input"):
        layer(torch.randn(1, 1, 4))


@pytest.mark.parametrize("cls", [DynOPool1d, DynOPool3d])
def test_tied_layers_share_one_parameter(seeded, cls):
    model = nn.Sequential(cls(0.5), cls(0.8))
    leader, follower = model[0], model[1]
    follower.tie_to(leader)
    assert follower.leader is leader and follower.alpha is leader.alpha
    assert list(model.state_dict()) == ["0.alpha"]
    x = torch.randn((1, 2, 24) if cls is DynOPool1d else (1, 2, 12, 10, 14))
    model(x).sum().backward()
    separate = [cls(0.5), cls(0.5)]
    separate[1](separate[0](x)).sum().backward()
    torch.testing.assert_close(leader.alpha.grad, separate[0].alpha.grad + separate[1].alpha.grad)
    leader.set_scale(0.25)
    assert follower.scale == leader.scale == (0.25,) * cls.ndim
    clone = copy.deepcopy(model)
    assert clone[1].leader is clone[0] and clone[1].alpha is not leader.alpha
    assert "tied" in repr(clone[1])


def test_tying_across_dimensions_is_refused():
    with pytest.raises(ValueError, match="cannot tie a DynOPool1d to a DynOPool3d"):
        DynOPool1d().tie_to(DynOPool3d())  # type: ignore[arg-type]


def test_chained_size_st_gives_the_continuous_derivative():
    first, second = DynOPool3d((0.5, 0.75, 0.4)).double(), DynOPool3d((0.6, 0.5, 0.8)).double()
    x = torch.randn(1, 1, 20, 16, 10, dtype=F64)
    y = second(first(x), in_size_st=first.last_size_st)
    assert tuple(second.last_size_st.tolist()) == y.shape[2:] == second.last_out_size
    second.last_size_st.sum().backward()
    a1, a2 = first.alpha.detach(), second.alpha.detach()
    n = torch.tensor([20.0, 16.0, 10.0], dtype=F64)
    torch.testing.assert_close(first.alpha.grad, -n / (a1**2 * a2), rtol=1e-12, atol=0)
    torch.testing.assert_close(second.alpha.grad, -first.last_size_st.detach() / a2**2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(2, 3, 16), (1, 2, 6, 9, 8)])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("scale", [0.5, 0.47, 1.3])
def test_inference_forward_equals_training_forward(seeded, shape, aggregate, scale):
    x = torch.randn(shape)
    layer = CLASSES[len(shape) - 2](scale, aggregate=aggregate)
    with torch.no_grad():
        fast = layer(x)
    torch.testing.assert_close(fast, layer(x), rtol=1e-6, atol=1e-6)
    if aggregate == "max":
        assert torch.equal(fast, layer(x))


def test_channels_last_3d(seeded):
    x = torch.randn(2, 5, 6, 8, 10)
    layer = DynOPool3d((0.5, 0.47, 1.3))
    x_cl = x.to(memory_format=torch.channels_last_3d).requires_grad_()
    x = x.requires_grad_()
    out, out_cl = layer(x), layer(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(out_cl, out, rtol=0, atol=0)
    grad = torch.randn_like(out)
    ga = torch.autograd.grad(out, (x, layer.alpha), grad)
    ga_cl = torch.autograd.grad(out_cl, (x_cl, layer.alpha), grad)
    torch.testing.assert_close(ga_cl[0], ga[0])
    torch.testing.assert_close(ga_cl[1], ga[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_low_precision(seeded, dtype):
    x = torch.randn(2, 3, 6, 10, 9)
    layer = DynOPool3d(0.47)
    expected = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        low = x.to(dtype).requires_grad_()
        out = layer(low)
    assert out.dtype == dtype and layer.last_size_st.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)
    out.float().sum().backward()
    assert layer.alpha.grad.dtype == torch.float32
    assert torch.isfinite(layer.alpha.grad).all() and torch.isfinite(low.grad.float()).all()


@pytest.mark.parametrize("shape", [(2, 2, 16), (1, 2, 6, 8, 7)])
@pytest.mark.parametrize("scale", [0.5, 0.47])
def test_torch_compile_matches_eager(seeded, shape, scale):
    ndim = len(shape) - 2
    layer = CLASSES[ndim](scale)
    conv = (nn.Conv1d if ndim == 1 else nn.Conv3d)(2, 3, 3, padding=1)
    model = nn.Sequential(conv, layer)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(shape)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    compiled_grad = layer.alpha.grad.clone()
    layer.alpha.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(compiled_grad, layer.alpha.grad)


def test_copies_after_a_training_forward_drop_the_graph_tensor():
    pool = DynOPool3d((0.4, 0.7, 0.5))
    pool(torch.randn(1, 2, 9, 11, 6, requires_grad=True)).sum().backward()
    for clone in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert clone.last_size_st is None
        assert torch.equal(clone.alpha, pool.alpha)
        assert clone.last_out_size == pool.last_out_size == (4, 8, 3)


def test_double_backward_says_what_to_do_instead():
    layer = DynOPool1d(0.47)
    x = torch.randn(1, 2, 9, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="DynOPool1d / DynOPool3d has no second derivative.*export.freeze"):
        grad.sum().backward()


def test_registered_as_timm_notrace_modules():
    from timm.layers import get_notrace_modules

    assert {DynOPool1d, DynOPool2d, DynOPool3d} <= set(get_notrace_modules())
