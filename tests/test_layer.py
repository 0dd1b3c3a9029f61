"""DynOPool2d against the grid_sample reference, MaxPool2d, finite differences and its contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from dynoswap import DynOPool2d
from dynoswap.layers import POSITION_GRADIENTS, output_size, straight_through_size
from tests.layer_vs_reference import assert_rel_close, layer_and_reference
from tests.reference_dynopool import reference_dynopool

F64 = torch.float64


GENERIC = [
    ((2, 3, 13, 17), 0.5),  # odd sizes at r = 0.5: no exact fast path
    ((1, 2, 20, 9), (0.37, 0.81)),  # anisotropic downscale
    ((2, 2, 7, 11), 1.7),  # upsampling
    ((1, 1, 5, 6), 3.0),
    ((3, 1, 23, 19), (0.29, 0.64)),
    ((1, 2, 9, 30), (1.3, 0.2)),  # one axis up, one down
    ((1, 1, 2, 3), 0.2),  # collapses to the 2-cell minimum
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


@pytest.mark.parametrize("floor_gradient", ["pass", "stop"])
@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_gradient_below_the_floor_passes_or_stops_as_chosen(seeded, floor_gradient, aggregate):
    # 3 * 0.2 = 0.6 cells: below the 1.5 floor on both axes, so the output is 2x2 either way.
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    (out, gx, ga), (ref, rx, ra) = layer_and_reference(x, 0.2, aggregate, floor_gradient)
    assert out.shape[-2:] == (2, 2)
    assert_rel_close(out, ref)
    assert_rel_close(gx, rx)
    if floor_gradient == "stop":
        assert torch.equal(ga, torch.zeros_like(ga))  # the literal max(., 1.5): nothing reaches alpha
    else:
        assert bool((ga != 0).all())  # a squeezed axis still learns (paper section 5)
        assert_rel_close(ga, ra)


def test_straight_through_size_gradient_below_the_floor():
    alpha = torch.tensor([10.0, 2.0], dtype=F64, requires_grad=True)
    size = straight_through_size(torch.tensor([9.0, 9.0], dtype=F64), alpha)  # 0.9 (floor) and 4.5
    assert size.tolist() == [2.0, 5.0]
    (grad,) = torch.autograd.grad(size.sum(), alpha)
    assert grad.tolist() == pytest.approx([-9.0 / 100.0, -9.0 / 4.0])  # d(n / alpha) / d(alpha) on both axes
    stopped = straight_through_size(torch.tensor([9.0, 9.0], dtype=F64), alpha, "stop")
    (grad,) = torch.autograd.grad(stopped.sum(), alpha)
    assert grad.tolist() == pytest.approx([0.0, -9.0 / 4.0])
    with pytest.raises(ValueError, match="floor_gradient"):
        DynOPool2d().set_floor_gradient("sometimes")


# Sizes whose grid coordinates are exact in binary: query points land exactly on pixel
# centres (r = 0.5) or exactly halfway (r = 2), where the one-sided slope convention matters.
EXACT = [((2, 3, 16, 16), 0.5), ((1, 2, 32, 8), 0.5), ((1, 2, 8, 16), 2.0), ((1, 1, 8, 8), (0.5, 2.0))]


@pytest.mark.parametrize(("shape", "scale"), EXACT)
@pytest.mark.parametrize("position_gradient", POSITION_GRADIENTS)
def test_matches_reference_on_pixel_centres(seeded, shape, scale, position_gradient):
    x = torch.randn(shape, dtype=F64)
    (out, gx, ga), (ref, rx, ra) = layer_and_reference(x, scale, position_gradient=position_gradient)
    assert_rel_close(out, ref)
    assert_rel_close(gx, rx)
    assert_rel_close(ga, ra)


@pytest.mark.parametrize("side", [+1, -1])
def test_matches_reference_next_to_a_rounding_boundary(seeded, side):
    # 9 * r = 4.5 rounds half up to 5; a hair below rounds to 4.
    r = 0.5 + side * 1e-9
    x = torch.randn(2, 2, 9, 9, dtype=F64)
    (out, gx, ga), (ref, rx, ra) = layer_and_reference(x, r)
    assert out.shape[-2:] == ((5, 5) if side > 0 else (4, 4))
    assert_rel_close(out, ref)
    assert_rel_close(gx, rx)
    assert_rel_close(ga, ra)


def tied_input(seeded_shape=(4, 8, 12, 14)) -> torch.Tensor:
    """Post-ReLU integers: most 2x2 windows hold ties, which MaxPool breaks by first position."""
    return torch.randint(-2, 3, seeded_shape).clamp_min(0).double()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("ties", [False, True])
def test_even_input_at_half_scale_is_maxpool(seeded, dtype, ties):
    x = (tied_input() if ties else torch.randn(4, 8, 12, 14)).to(dtype)
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    layer = DynOPool2d(0.5).to(dtype)
    out = layer(x)
    expected = nn.MaxPool2d(2, 2)(x_ref)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)


def test_alpha_gradient_matches_finite_difference_of_relaxation(seeded):
    # The alpha gradient is the derivative of the output with the query points placed by the
    # continuous size n / alpha (cell count held fixed). At alpha with integral n / alpha
    # (15 / 2.5 = 6, 15 / 1.25 = 12) the straight-through size equals the continuous one.
    x = torch.randn(2, 3, 15, 15, dtype=F64)
    layer = DynOPool2d((0.4, 0.8)).double()
    layer.alpha.data = torch.tensor([2.5, 1.25], dtype=F64)
    weights = torch.randn_like(layer(x))
    (layer(x) * weights).sum().backward()
    eps = 1e-6
    numeric = []
    for axis in range(2):
        step = torch.zeros(2, dtype=F64)
        step[axis] = eps
        alpha = layer.alpha.detach()
        up = (reference_dynopool(x, alpha + step, continuous=True) * weights).sum()
        down = (reference_dynopool(x, alpha - step, continuous=True) * weights).sum()
        numeric.append((up - down).item() / (2 * eps))
    torch.testing.assert_close(layer.alpha.grad, torch.tensor(numeric, dtype=F64), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("shape", [(2, 2, 12, 15), (1, 3, 20, 15)])
def test_pixel_centre_slope_is_the_right_derivative(seeded, shape):
    # Rows: even height at r = 0.5, every query row on a pixel centre, where the output is
    # not differentiable; the convention (slope towards the next pixel) is the derivative
    # from the right, since every query point moves up as alpha grows. Columns: 15 / 2.5 = 6
    # cells, query points between pixels, an ordinary central difference. That holds for the
    # "position" rule; under "displacement" the lower query of each cell moves down, so no
    # one-sided difference matches it here (the ramp test below pins that rule with exact values).
    x = torch.randn(shape, dtype=F64)
    layer = DynOPool2d((0.5, 0.4)).double()
    layer.set_scale((0.5, 0.4))
    layer.set_position_gradient("position")
    weights = torch.randn_like(layer(x))
    weights[:, :, 0] = 0  # row 0 sits on the border: zero gradient there, unlike a one-sided difference
    (layer(x) * weights).sum().backward()
    alpha = layer.alpha.detach()

    def loss(a: torch.Tensor) -> float:
        return (reference_dynopool(x, a, continuous=True, position_gradient="position") * weights).sum().item()

    eps = 1e-7
    right = (loss(alpha + torch.tensor([eps, 0.0], dtype=F64)) - loss(alpha)) / eps
    step = torch.tensor([0.0, eps], dtype=F64)
    central = (loss(alpha + step) - loss(alpha - step)) / (2 * eps)
    torch.testing.assert_close(layer.alpha.grad, torch.tensor([right, central], dtype=F64), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("position_gradient", "aggregate", "expected"),
    [
        # Each cell's upper query (the max on a rising ramp) is p_k + delta, delta = alpha / 4 pixels
        # (eq. 2 at n_in / alpha = n_out): d(sum)/d(alpha) = cells * slope / 4 per axis.
        ("displacement", "max", (30 * 3 / 4, 30 * 5 / 4)),
        # The mean of p_k -+ delta on a ramp is the ramp at p_k: nothing for the displacement to change.
        ("displacement", "mean", (0.0, 0.0)),
        # The whole position alpha (4k + 3) / 4 - 1/2 moves: sum_k (4k + 3) / 4 * other-axis cells * slope.
        ("position", "max", (55 / 4 * 6 * 3, 78 / 4 * 5 * 5)),
    ],
)
def test_alpha_gradient_on_a_ramp_is_the_papers_displacement(position_gradient, aggregate, expected):
    # f = 3 i + 5 j; 12 / 2.4 = 5 and 15 / 2.5 = 6 cells, every query point strictly between pixels.
    i, j = torch.meshgrid(torch.arange(12, dtype=F64), torch.arange(15, dtype=F64), indexing="ij")
    x = (3 * i + 5 * j)[None, None]
    layer = DynOPool2d(aggregate=aggregate).double()
    layer.alpha.data = torch.tensor([2.4, 2.5], dtype=F64)
    layer.set_position_gradient(position_gradient)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.alpha.grad, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="position_gradient"):
        layer.set_position_gradient("centre")


def test_size_rule_and_straight_through_gradient():
    layer = DynOPool2d((0.5, 0.3))
    assert layer.output_size((224, 10)) == (112, 3)
    assert layer.output_size((5, 5)) == (3, 2)  # 2.5 rounds half up; 1.5 -> 2
    assert layer.output_size((1, 1)) == (2, 2)  # never below 2
    alpha = torch.tensor([2.0, 4.0], requires_grad=True)
    size = straight_through_size(torch.tensor([9.0, 4.0]), alpha)
    assert size.tolist() == [5.0, 2.0]  # 4.5 -> 5; 1.0 clamped to 1.5 -> 2
    size.sum().backward()
    assert alpha.grad.tolist() == [-9.0 / 4.0, -4.0 / 16.0]  # d(n/a)/da, below the bound too (passes)
    assert output_size((9, 4), alpha) == (5, 2)


def test_chained_size_st_gives_the_continuous_derivative():
    first, second = DynOPool2d((0.5, 0.75)).double(), DynOPool2d((0.6, 0.5)).double()
    x = torch.randn(1, 1, 40, 36, dtype=F64)
    y = second(first(x), in_size_st=first.last_size_st)
    assert tuple(second.last_size_st.tolist()) == y.shape[-2:] == second.last_out_size
    second.last_size_st.sum().backward()
    a1, a2 = first.alpha.detach(), second.alpha.detach()
    # size2 = size1 / a2 with size1 = n / a1 (values rounded, gradients continuous), so
    # d size2 / d a1 = -n / (a1^2 a2) and d size2 / d a2 = -size1 / a2^2.
    n = torch.tensor([40.0, 36.0], dtype=F64)
    size1 = first.last_size_st.detach()
    torch.testing.assert_close(first.alpha.grad, -n / (a1**2 * a2), rtol=1e-12, atol=0)
    torch.testing.assert_close(second.alpha.grad, -size1 / a2**2, rtol=1e-12, atol=0)


def test_records_last_sizes():
    layer = DynOPool2d(0.5)
    out = layer(torch.randn(1, 2, 9, 12))
    assert layer.last_in_size == (9, 12)
    assert layer.last_out_size == tuple(out.shape[-2:]) == (5, 6)
    assert layer.last_size_st.tolist() == [5.0, 6.0]
    assert layer.last_size_st.requires_grad


def test_scale_and_set_scale():
    layer = DynOPool2d((0.5, 0.25))
    assert layer.alpha.tolist() == [2.0, 4.0]
    assert layer.scale == (0.5, 0.25)
    layer.set_scale(2.0)
    assert layer.scale == (2.0, 2.0)
    assert layer(torch.randn(1, 1, 3, 4)).shape == (1, 1, 6, 8)
    assert "scale=(2, 2)" in repr(layer)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: DynOPool2d(0.0), "scale factors must be finite and > 0"),
        (lambda: DynOPool2d(-0.5), "scale factors must be finite and > 0"),
        (lambda: DynOPool2d(float("nan")), "scale factors must be finite and > 0"),
        (lambda: DynOPool2d((0.5, math.inf)), "scale factors must be finite and > 0"),
        (lambda: DynOPool2d((0.5, 0.5, 0.5)), "init_scale must be a number or an"),
        (lambda: DynOPool2d(0.5, aggregate="median"), "aggregate must be one of"),
        (lambda: DynOPool2d().set_scale(0), "scale factors must be finite and > 0"),
        (lambda: DynOPool2d()(torch.randn(2, 8, 8)), "expects a 4D"),
        (lambda: DynOPool2d()(torch.randn(1, 2, 8, 8, 1)), "expects a 4D"),
    ],
)
def test_bad_arguments_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_mismatched_upstream_size_raises():
    with pytest.raises(ValueError, match="does not match the input's spatial size"):
        DynOPool2d()(torch.randn(1, 1, 8, 8), in_size_st=torch.tensor([8.0, 9.0]))


def test_non_positive_alpha_raises_in_forward():
    layer = DynOPool2d()
    with torch.no_grad():
        layer.alpha[1] = -1.0
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        layer(torch.randn(1, 1, 8, 8))
    with torch.no_grad():
        layer.alpha[1] = float("nan")
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        layer(torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_loading_a_bad_alpha_raises_and_keeps_the_old_one(bad):
    model = nn.Sequential(DynOPool2d((0.5, 0.25)), DynOPool2d(0.8))
    model[1].tie_to(model[0])
    state = {"0.alpha": torch.tensor([2.0, bad])}
    with pytest.raises(ValueError, match="alpha must be finite and > 0"):
        model.load_state_dict(state)
    assert model[0].alpha.tolist() == [2.0, 4.0]
    model.load_state_dict({"0.alpha": torch.tensor([3.0, 1.5])})
    assert model[1].scale == pytest.approx((1 / 3, 1 / 1.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [0.5, 0.47])
def test_autocast_low_precision(seeded, dtype, scale):
    x = torch.randn(2, 3, 20, 18)
    layer = DynOPool2d(scale)
    expected = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        low = x.to(dtype).requires_grad_()
        out = layer(low)
    assert out.dtype == dtype
    assert layer.last_size_st.dtype == torch.float32  # positions stay float32
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)
    out.float().sum().backward()
    assert layer.alpha.grad.dtype == torch.float32
    assert torch.isfinite(layer.alpha.grad).all() and torch.isfinite(low.grad.float()).all()


@pytest.mark.parametrize("scale", [0.5, (0.47, 1.3)])
def test_channels_last(seeded, scale):
    x = torch.randn(2, 5, 14, 12)
    layer = DynOPool2d(scale)
    x_cl = x.to(memory_format=torch.channels_last).requires_grad_()
    x = x.requires_grad_()
    out, out_cl = layer(x), layer(x_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_cl, out, rtol=0, atol=0)
    grad = torch.randn_like(out)
    ga = torch.autograd.grad(out, (x, layer.alpha), grad)
    ga_cl = torch.autograd.grad(out_cl, (x_cl, layer.alpha), grad)
    torch.testing.assert_close(ga_cl[0], ga[0])  # same sums, possibly in another order
    torch.testing.assert_close(ga_cl[1], ga[1])


@pytest.mark.parametrize("scale", [0.5, (0.47, 1.3)])
def test_strided_input(seeded, scale):
    base = torch.randn(2, 3, 12, 16, dtype=F64)
    strided = base.transpose(2, 3).requires_grad_()  # (2, 3, 16, 12), not contiguous in any format
    dense = strided.detach().contiguous().requires_grad_()
    layer = DynOPool2d(scale).double()
    out, out_dense = layer(strided), layer(dense)
    assert_rel_close(out, out_dense, rel=1e-12)
    grad = torch.randn_like(out)
    ga = torch.autograd.grad(out, (strided, layer.alpha), grad)
    gb = torch.autograd.grad(out_dense, (dense, layer.alpha), grad)
    assert_rel_close(ga[0], gb[0], rel=1e-12)
    assert_rel_close(ga[1], gb[1], rel=1e-9)


@pytest.mark.parametrize("scale", [0.5, 0.47])
def test_torch_compile_matches_eager(seeded, scale):
    layer = DynOPool2d(scale)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), layer)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 2, 16, 14)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    compiled_grad = layer.alpha.grad.clone()
    layer.alpha.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(compiled_grad, layer.alpha.grad)


@pytest.mark.slow
def test_torch_compile_inductor(seeded):
    layer = DynOPool2d(0.47)
    x = torch.randn(1, 2, 16, 14)
    torch.testing.assert_close(torch.compile(layer)(x), layer(x))


class TwoPools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.pool = DynOPool2d(0.5)
        self.pool2 = DynOPool2d(0.7)

    def forward(self, x):
        return self.pool2(self.pool(self.conv(x)))


def test_is_an_fx_leaf():
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, DynOPool2d) or super().is_leaf_module(m, qualname)

    model = TwoPools()
    graph = LeafTracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    targets = [n.target for n in graph.nodes if n.op == "call_module"]
    assert targets == ["conv", "pool", "pool2"]
    x = torch.randn(1, 1, 12, 12)
    torch.testing.assert_close(gm(x), model(x))


def test_registered_as_timm_notrace_module():
    from timm.layers import get_notrace_modules
    from timm.models import create_feature_extractor

    assert DynOPool2d in get_notrace_modules()
    extractor = create_feature_extractor(TwoPools(), return_nodes=["pool"])
    assert isinstance(extractor.get_submodule("pool"), DynOPool2d)
    assert extractor(torch.randn(1, 1, 12, 12))["pool"].shape == (1, 2, 6, 6)


def test_tied_layers_share_one_parameter(seeded):
    model = nn.Sequential(DynOPool2d(0.5), DynOPool2d(0.8))
    leader, follower = model[0], model[1]
    follower.tie_to(leader)
    assert follower.leader is leader and follower.alpha is leader.alpha
    assert list(model.state_dict()) == ["0.alpha"]
    assert len(list(model.parameters())) == 1
    x = torch.randn(1, 2, 24, 20)
    model(x).sum().backward()
    tied_grad = leader.alpha.grad.clone()
    # Gradients of the shared alpha sum over both uses.
    separate = [DynOPool2d(0.5), DynOPool2d(0.5)]
    separate[1](separate[0](x)).sum().backward()
    torch.testing.assert_close(tied_grad, separate[0].alpha.grad + separate[1].alpha.grad)
    leader.set_scale(0.25)
    assert follower.scale == (0.25, 0.25)
    follower.tie_to(follower)  # tying to itself (or its leader) is a no-op
    assert follower.leader is leader


def test_deepcopy_keeps_the_tie():
    model = nn.Sequential(DynOPool2d(0.5), DynOPool2d(0.8))
    model[1].tie_to(model[0])
    clone = copy.deepcopy(model)
    assert clone[1].leader is clone[0]
    assert clone[1].alpha is clone[0].alpha is not model[0].alpha
    clone[0].set_scale(0.3)
    assert clone[1].scale == pytest.approx((0.3, 0.3)) and model[1].scale == (0.5, 0.5)
    assert "tied" in repr(clone[1])


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [0.5, 0.47, 1.6])
def test_cuda_matches_reference(seeded, scale):
    (out, gx, ga), (ref, rx, ra) = layer_and_reference(torch.randn(2, 3, 22, 17, dtype=F64, device="cuda"), scale)
    assert out.is_cuda and gx.is_cuda
    assert_rel_close(out, ref)
    assert_rel_close(gx, rx)
    assert_rel_close(ga, ra)


@pytest.mark.parametrize("scale", [0.5, 0.47, (1.4, 0.3)])
def test_inference_forward_equals_training_forward(seeded, scale):
    x = torch.randn(2, 3, 16, 12)
    layer = DynOPool2d(scale)
    with torch.no_grad():
        fast = layer(x)
    assert torch.equal(fast, layer(x))
    x[0, 0, 0, 0] = float("nan")  # NaN propagates like max_pool2d
    with torch.no_grad():
        assert torch.isnan(layer(x)[0, 0, 0, 0]) and not torch.isnan(layer(x)[1]).any()


@pytest.mark.parametrize("scale", [0.5, 0.47, 1.3])
def test_float32_alpha_gradient_on_smooth_offset_images(seeded, scale):
    # Large values with small slopes: sums of products must not cancel catastrophically.
    x = F.interpolate(torch.randn(4, 8, 6, 6), size=(48, 40), mode="bicubic", align_corners=False) + 5.0
    grads = []
    for dtype in (torch.float32, F64):
        layer = DynOPool2d(scale).to(dtype)
        layer.set_scale(scale)
        layer(x.to(dtype).requires_grad_()).sum().backward()
        grads.append(layer.alpha.grad.double())
    assert_rel_close(grads[0], grads[1], rel=1e-4)


def test_copies_after_a_training_forward_drop_the_graph_tensor():
    import pickle

    pool = DynOPool2d((0.4, 0.7))
    pool(torch.randn(1, 2, 9, 11, requires_grad=True)).sum().backward()
    assert pool.last_size_st is not None and pool.last_size_st.grad_fn is not None
    for clone in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert clone.last_size_st is None
        assert torch.equal(clone.alpha, pool.alpha)
        assert clone.last_out_size == pool.last_out_size == (4, 8)


def test_double_backward_says_what_to_do_instead():
    layer = DynOPool2d((0.47, 0.6))
    x = torch.randn(1, 2, 9, 9, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)  # a first derivative works
    with pytest.raises(RuntimeError, match="DynOPool2d has no second derivative.*dynoswap.export.freeze"):
        grad.sum().backward()


def test_scale_reads_back_as_set_at_float32_precision():
    pool = DynOPool2d(0.5)
    pool.set_scale((0.6, 0.45))
    assert pool.scale == (0.6, 0.45)  # not float32's expansion 0.6000000143051151
    assert torch.tensor(pool.scale, dtype=torch.float32).equal(pool.alpha.detach().reciprocal())
    pool.set_scale(1 / 3)
    assert pool.scale == (0.33333334, 0.33333334)  # float32 has no more digits to give
