"""The paper's output-size rule (eq. 1, 3, 4 and the size bound of section 5.1).

Every place that needs a DynOPool output size (the layer, the cost model, the
CLI, frozen models) goes through these functions, so integer sizes never disagree.
"""

from __future__ import annotations

import math
import struct

import torch

from ..validate import FLOOR_GRADIENTS

#: Lower bound on the continuous size: ``round(max(n, 1.5))`` is never below 2.
MIN_SIZE = 1.5


def continuous_size(
    n_in: torch.Tensor | float, alpha: torch.Tensor, floor_gradient: str = FLOOR_GRADIENTS[0]
) -> torch.Tensor:
    """Return the continuous size ``max(n_in / alpha, 1.5)`` with the floor's gradient as ``floor_gradient`` says.

    Args:
        n_in: Input size, a number or a (possibly straight-through) tensor.
        alpha: Inverse scale ``1 / r`` (eq. 6).
        floor_gradient: ``"pass"`` (gradient of ``n_in / alpha`` everywhere) or ``"stop"``.
    """
    raw = n_in / alpha
    bounded = torch.clamp_min(raw, MIN_SIZE)
    if floor_gradient == "stop":
        return bounded
    return raw + (bounded - raw).detach()


def straight_through_size(
    n_in: torch.Tensor | float, alpha: torch.Tensor, floor_gradient: str = FLOOR_GRADIENTS[0]
) -> torch.Tensor:
    """Output size whose value is an integer and whose gradient is continuous.

    Forward: ``round(max(n_in / alpha, 1.5))`` (round half up). Backward: the
    derivative of the continuous size (straight-through, eq. 3-4); below the bound
    it is that of ``n_in / alpha`` (``floor_gradient="pass"``, the default) or zero
    (``"stop"``, the literal clamp).

    Args:
        n_in: Input size, a number or a (possibly straight-through) tensor.
        alpha: Inverse scale ``1 / r`` (eq. 6), same shape as the result.
        floor_gradient: One of :data:`dynoswap.validate.FLOOR_GRADIENTS`.

    Returns:
        Tensor of sizes with integer values.
    """
    cont = continuous_size(n_in, alpha, floor_gradient)
    return cont + (torch.floor(cont + 0.5) - cont).detach()


def output_size(n_in: tuple[int, ...], alpha: torch.Tensor) -> tuple[int, ...]:
    """Integer output size for an integer input size, one length per axis, as the forward pass uses it.

    Args:
        n_in: Input length of each axis: ``(l,)``, ``(h, w)`` or ``(t, h, w)``.
        alpha: Inverse scales, one per axis.
    """
    with torch.no_grad():
        n = torch.tensor(n_in, dtype=alpha.dtype, device=alpha.device)
        size = straight_through_size(n, alpha.detach())
    return tuple(int(v) for v in size.tolist())


def _round_to_float32(value: float) -> float:
    return struct.unpack("f", struct.pack("f", value))[0]


def cells(n_in: int, alpha: float, dtype: torch.dtype = torch.float32) -> int:
    """:func:`output_size` of one axis in plain Python, rounded step by step as ``dtype`` rounds.

    For code that must not read tensors (a frozen model traced by ``torch.export``).
    Each step is computed in float64 and rounded to float32 when ``dtype`` is float32:
    for one division or addition of float32 operands that equals float32 arithmetic,
    so the result is the layer's size bit for bit.

    Args:
        n_in: Input length of the axis.
        alpha: Inverse scale of the axis, as stored (a float32 or float64 value).
        dtype: The dtype the layer computes sizes in: float32 or float64.
    """
    fit = (lambda v: v) if dtype == torch.float64 else _round_to_float32
    cont = max(fit(n_in / fit(alpha)), MIN_SIZE)
    return math.floor(fit(cont + 0.5))
