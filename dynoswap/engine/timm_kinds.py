"""timm's own resizer kinds: the anti-aliased blur pool (``BlurPool2d``, timm's ``aa_layer="blur"``).

A blur pool is a fixed binomial depthwise blur at stride s (Zhang, "Making Convolutional Networks
Shift-Invariant Again", 2019): a resizer like a strided conv. It is converted by the conv rules:
``conv_post`` runs the blur at stride 1 with size-preserving padding (its own reflect or constant
padding mode kept) and puts a DynOPool with mean aggregation after it (the blur is a low-pass filter
that then averages, never a max); ``conv_pre`` puts the DynOPool before the stride-1 blur. A
converted model keeps no fixed stride-s blur, and the scale of every blur site is learned.

timm is imported lazily, the first time a model is traced (:func:`register_timm_kinds`).
"""

from __future__ import annotations

import functools
from typing import Any

from torch import fx, nn

from .find import Found, Resizer, register_module
from .rewrite import STRIDE_ONE


def _pad_total(kernel: int) -> tuple[int, int]:
    """Return the padding (before, after) that keeps a stride-1 ``kernel``-tap filter's size (more after when odd)."""
    total = kernel - 1
    return total // 2, total - total // 2


def blur_pool(node: fx.Node, m: Any) -> Found:
    """Find a strided BlurPool2d: a resizer of kind ``conv`` (a fixed depthwise conv) with mean aggregation."""
    stride = (int(m.stride), int(m.stride)) if isinstance(m.stride, int) else tuple(int(s) for s in m.stride)
    if stride == (1, 1):
        return None
    left, _, top, _ = (int(p) for p in m.padding)
    return Resizer(node, "conv", type(m).__name__, stride, (m.filt_size, m.filt_size), "mean", (top, left))


def blur_stride_one(m: Any) -> None:
    """Run a BlurPool2d at stride 1; its F.pad keeps the input size (asymmetric for an even filter)."""
    m.stride = 1
    before, after = _pad_total(m.filt_size)
    m.padding = [before, after, before, after]


@functools.cache
def register_timm_kinds() -> tuple[type[nn.Module], ...]:
    """Register timm's resizer kinds with the finder and the stride-1 rules (once).

    Returns:
        The module types that must stay leaves when tracing (each is one node the rules rewrite).
    """
    try:
        from timm.layers.blur_pool import BlurPool2d
    except ImportError:  # timm is a dependency, but plain torch models must not need it
        return ()
    register_module(BlurPool2d)(blur_pool)
    STRIDE_ONE[BlurPool2d] = blur_stride_one
    return (BlurPool2d,)
