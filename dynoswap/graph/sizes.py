"""Integer size arithmetic of sliding-window ops (convolutions and pools), PyTorch's formulas."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

SizeRule = Callable[[int], int]


def _sliding_rule(kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> SizeRule:
    """PyTorch's output-length formula for convolutions and pools along one axis."""

    def rule(n: int) -> int:
        span = n + 2 * padding - dilation * (kernel - 1) - 1
        if ceil_mode:
            out = -(-span // stride) + 1
            # PyTorch drops a last window that would start in the padding.
            if (out - 1) * stride >= n + padding:
                out -= 1
            return out
        return span // stride + 1

    return rule


def _axis(value: Any, axis: int) -> int:
    return int(value[axis] if isinstance(value, (tuple, list)) else value)


def _sliding_rules(m: nn.Module) -> tuple[SizeRule, ...] | None:
    if isinstance(m.padding if hasattr(m, "padding") else 0, str):
        return None  # "same"/"valid" convs keep or shrink by a fixed amount: the ratio fallback is fine
    dilation = getattr(m, "dilation", 1)
    ceil_mode = bool(getattr(m, "ceil_mode", False))
    return tuple(
        _sliding_rule(
            _axis(m.kernel_size, a),
            _axis(m.stride if m.stride is not None else m.kernel_size, a),
            _axis(m.padding, a),
            _axis(dilation, a),
            ceil_mode,
        )
        for a in range(SLIDING_NDIM[type(m)] if type(m) in SLIDING_NDIM else _ndim_of(m))
    )


def _ndim_of(m: nn.Module) -> int:
    """Spatial axes of a subclass of a registered conv or pool (its base class says)."""
    return next(SLIDING_NDIM[cls] for cls in type(m).__mro__ if cls in SLIDING_NDIM)


#: Spatial axes of each sliding-window module type.
SLIDING_NDIM: dict[type[nn.Module], int] = {
    nn.Conv1d: 1,
    nn.MaxPool1d: 1,
    nn.AvgPool1d: 1,
    nn.Conv2d: 2,
    nn.MaxPool2d: 2,
    nn.AvgPool2d: 2,
    nn.Conv3d: 3,
    nn.MaxPool3d: 3,
    nn.AvgPool3d: 3,
}


#: Exact integer size rules of fixed resizers, by module type.
SIZE_RULES: dict[type[nn.Module], Callable[[nn.Module], tuple[SizeRule, ...] | None]] = dict.fromkeys(
    SLIDING_NDIM, _sliding_rules
)
