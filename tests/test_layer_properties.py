"""Property tests: the size rule, bounded finite outputs and finite gradients for any size and scale."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynoswap import DynOPool2d

sizes = st.integers(min_value=1, max_value=24)
scales = st.floats(min_value=0.05, max_value=3.0, allow_nan=False)


def expected_cells(n: int, alpha: float) -> int:
    """The rule in plain Python: round half up of max(n / alpha, 1.5)."""
    return math.floor(max(n / alpha, 1.5) + 0.5)


@settings(max_examples=50, deadline=None)
@given(
    batch=st.integers(1, 2),
    channels=st.integers(1, 3),
    h=sizes,
    w=sizes,
    r_h=scales,
    r_w=scales,
    aggregate=st.sampled_from(["max", "mean"]),
    seed=st.integers(0, 2**16),
)
def test_shape_values_and_gradients(batch, channels, h, w, r_h, r_w, aggregate, seed):
    torch.manual_seed(seed)
    layer = DynOPool2d((r_h, r_w), aggregate=aggregate).double()
    layer.set_scale((r_h, r_w))
    x = torch.randn(batch, channels, h, w, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    a_h, a_w = layer.alpha.tolist()
    assert out.shape == (batch, channels, expected_cells(h, a_h), expected_cells(w, a_w))
    assert layer.output_size((h, w)) == tuple(out.shape[-2:])
    # Every query value is a convex combination of input pixels, so is every aggregate.
    assert torch.isfinite(out).all()
    assert out.min() >= x.min() - 1e-12 and out.max() <= x.max() + 1e-12
    out.backward(torch.randn_like(out))
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.alpha.grad).all()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 300), r=st.floats(min_value=0.01, max_value=4.0, allow_nan=False))
def test_size_is_the_rounded_straight_through_value(n, r):
    layer = DynOPool2d(r).double()
    layer.set_scale(r)
    size = layer.size_st((n, n))
    cells = expected_cells(n, layer.alpha[0].item())
    assert size.tolist() == [cells, cells] and cells >= 2
    assert layer.output_size((n, n)) == (cells, cells)
