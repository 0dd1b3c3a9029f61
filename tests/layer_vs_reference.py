"""The comparison the layer tests share: a DynOPool and the equations' reference on one input."""

from __future__ import annotations

import torch

from dynoswap import DynOPool1d, DynOPool2d, DynOPool3d
from tests.reference_dynopool import reference_dynopool_nd

CLASSES = {1: DynOPool1d, 2: DynOPool2d, 3: DynOPool3d}


def layer_and_reference(
    x: torch.Tensor,
    scale,
    aggregate: str = "max",
    floor_gradient: str = "pass",
    position_gradient: str = "displacement",
):
    """Outputs and gradients (wrt x and alpha) of the layer and of the reference, one upstream grad."""
    layer = CLASSES[x.dim() - 2](scale, aggregate=aggregate).to(device=x.device, dtype=x.dtype)
    layer.set_scale(scale)  # alpha exactly 1 / r in x's dtype, not a widened float32
    layer.set_floor_gradient(floor_gradient)
    layer.set_position_gradient(position_gradient)
    x = x.detach().requires_grad_()
    out = layer(x)
    grad = torch.randn_like(out)
    gx, ga = torch.autograd.grad(out, (x, layer.alpha), grad)
    alpha = layer.alpha.detach().clone().requires_grad_()
    ref = reference_dynopool_nd(x, alpha, aggregate, floor_gradient=floor_gradient, position_gradient=position_gradient)
    rx, ra = torch.autograd.grad(ref, (x, alpha), grad)
    return (out, gx, ga), (ref, rx, ra)


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-6) -> None:
    """Relative error in the max norm, so sums of many terms are judged at their own scale."""
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max() / scale
    assert err <= rel, f"relative error {err.item():.3g} > {rel}"
