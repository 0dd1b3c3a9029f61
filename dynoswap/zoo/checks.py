"""Argument checks shared by the zoo's factories: a ValueError names the argument (the caller's fault)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_count(name: str, value: object) -> int:
    """Return ``value`` when it is a whole number >= 1, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


def check_widths(widths: object) -> Sequence[int]:
    """Return ``widths`` when it is a non-empty sequence of whole numbers >= 1, else raise ValueError."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not widths:
        raise ValueError(f"widths must be a non-empty list of channel counts, got {widths!r}")
    for c in widths:
        check_count("a width", c)
    return widths


def scaled(widths: Sequence[int], width: object) -> list[int]:
    """Channels ``round(c * width)``, at least 1 each, for a positive finite ``width``; ValueError otherwise."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a positive number (1.0 keeps the default channels), got {width!r}")
    return [max(1, round(c * width)) for c in widths]
