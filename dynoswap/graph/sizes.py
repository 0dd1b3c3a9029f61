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


def _sliding_rules(m: nn.Module) -> tuple[SizeRule, SizeRule] | None:
    if isinstance(m.padding if hasattr(m, "padding") else 0, str):
        return None  # "same"/"valid" convs keep or shrink by a fixed amount: the ratio fallback is fine
    dilation = getattr(m, "dilation", 1)
    ceil_mode = bool(getattr(m, "ceil_mode", False))
    return tuple(  # type: ignore[return-value]
        _sliding_rule(
            _axis(m.kernel_size, a),
            _axis(m.stride if m.stride is not None else m.kernel_size, a),
            _axis(m.padding, a),
            _axis(dilation, a),
            ceil_mode,
        )
        for a in (0, 1)
    )


#: Exact integer size rules of fixed resizers, by module type.
SIZE_RULES: dict[type[nn.Module], Callable[[nn.Module], tuple[SizeRule, SizeRule] | None]] = {
    nn.Conv2d: _sliding_rules,
    nn.MaxPool2d: _sliding_rules,
    nn.AvgPool2d: _sliding_rules,
}
