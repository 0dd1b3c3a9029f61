"""Argument checks shared by the library's entry points: a misuse is one clear TypeError or OptionError.

An :class:`~dynoswap.errors.OptionError` is a ``ValueError``, so ``except ValueError`` keeps working.

Imports no heavy library at import time, so the CLI can check its options cheaply.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

from .errors import OptionError

#: Smallest output side a DynOPool produces: its size rule rounds ``max(n / alpha, 1.5)`` half up
#: (``dynoswap.layers.sizing.MIN_SIZE``), so 2 is the smallest size a target can hit exactly.
MIN_OUTPUT_SIDE = 2

# -- limits on sizes an untrusted file or argument may ask for (allocations stay bounded) --------
#: Largest input side (H or W).
MAX_INPUT_SIDE = 16384
#: Largest input area H * W of one image (8192 x 8192).
MAX_INPUT_PIXELS = 8192 * 8192
#: Largest batch of an export or a measurement.
MAX_BATCH = 4096
#: Largest batch * H * W of one forward (e.g. 64 images of 2048 x 2048).
MAX_BATCH_PIXELS = 1 << 28
#: Largest scale factor r = 1 / alpha of a DynOPool (upsampling by at most this much per axis).
MAX_SCALE = 8.0
#: Largest target size relative to the input side (the same bound, for sizes given as integers).
MAX_UPSAMPLE = 8

# -- the DynOPool's training-time gradient rules (the first of each is the default) ---------------
#: The size's gradient where ``n / alpha`` is below the 1.5 floor: ``"pass"`` lets it through (paper
#: section 5: gradients reach "any dimension smaller than 2"), ``"stop"`` is the literal ``max(., 1.5)``.
FLOOR_GRADIENTS = ("pass", "stop")
#: What of the query positions carries the size's gradient: ``"displacement"`` (paper eq. 5: each
#: query point's displacement ``delta`` from its cell centre; the centres stay on the integer grid) or
#: ``"position"`` (the whole position, centre included: a zoom anchored at the input's first pixel,
#: whose translation part carries no information about the size and dominates on large maps; the
#: earlier rule).
POSITION_GRADIENTS = ("displacement", "position")


def _is_int(value: Any) -> bool:
    # bool is an int subclass but never a size; numpy integers are Integral too.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


#: How a size of 1, 2 or 3 spatial axes is described in messages.
_SIZE_SHAPES = {1: "(L,)", 2: "(h, w)", 3: "(T, H, W)"}


def _size_words(ndims: Sequence[int]) -> str:
    if tuple(ndims) == (2,):
        return "a pair of integers (h, w)"
    if len(ndims) == 1:
        return f"{ndims[0]} integers {_SIZE_SHAPES[ndims[0]]}"
    return "1 to 3 integers: " + ", ".join(_SIZE_SHAPES[n] for n in ndims)


def check_size(value: Any, what: str, low: int = 1, ndims: Sequence[int] = (2,)) -> tuple[int, ...]:
    """Return ``value`` as a tuple of integers >= ``low``, one per spatial axis.

    Args:
        value: The size.
        what: How messages name it.
        low: Smallest side.
        ndims: Accepted numbers of axes: (2,) for an image size (the default), (1, 2, 3) for any input.

    Raises:
        TypeError: Not a sequence of integers (floats such as 64.5 and booleans included).
        OptionError: A side below ``low``, or a number of axes not in ``ndims``.
    """
    words = _size_words(ndims)
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{what} must be {words}, got {value!r}")
    values = tuple(value)
    if len(values) not in ndims:
        raise OptionError(f"{what} must be {words}, got {len(values)} values: {value!r}")
    if not all(_is_int(v) for v in values):
        raise TypeError(f"{what} must be {words}, got {value!r}")
    sides = tuple(int(v) for v in values)
    if min(sides) < low:
        raise OptionError(f"{what} must be at least {low} on each side, got {sides}")
    return sides


def check_input_budget(size: Sequence[int], what: str, batch: int = 1) -> tuple[int, ...]:
    """Refuse an input size or batch that would allocate without bound; returns the size as ints.

    Raises:
        ValueError: A side over :data:`MAX_INPUT_SIDE`, an extent (length, area or volume) over
            :data:`MAX_INPUT_PIXELS`, a batch over :data:`MAX_BATCH`, or batch * extent over
            :data:`MAX_BATCH_PIXELS`.
    """
    return check_input_extent(size, what, batch)


#: How the spatial axes of an input of 1, 2 or 3 axes are named in messages.
_AXES = {1: "L", 2: "H x W", 3: "T x H x W"}


def check_input_extent(size: Sequence[int], what: str, batch: int = 1) -> tuple[int, ...]:
    """:func:`check_input_budget` for 1, 2 or 3 spatial axes: the bounds apply to the length, area or volume.

    Raises:
        ValueError: As :func:`check_input_budget`, or not 1 to 3 axes.
    """
    sides = tuple(int(v) for v in size)
    if len(sides) not in _AXES:
        raise ValueError(f"{what} must have 1, 2 or 3 sides, got {sides}")
    shown = "x".join(map(str, sides))
    extent = math.prod(sides)
    if max(sides) > MAX_INPUT_SIDE or extent > MAX_INPUT_PIXELS:
        raise ValueError(
            f"{what} {shown} is too large: at most {MAX_INPUT_SIDE} on a side and {MAX_INPUT_PIXELS} pixels in all"
        )
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch {batch} is out of range: 1 to {MAX_BATCH}")
    if batch * extent > MAX_BATCH_PIXELS:
        raise ValueError(
            f"batch {batch} of {shown} inputs is too large: batch x {_AXES[len(sides)]} "
            f"must be at most {MAX_BATCH_PIXELS}"
        )
    return sides


def check_target_sizes(sizes: Any, ndim: int = 2) -> list[tuple[int, ...]]:
    """Validate ``sizes=``: one size per tie group (``ndim`` sides), each at least :data:`MIN_OUTPUT_SIDE`.

    Raises:
        TypeError: Not a sequence of integer sizes.
        OptionError: A target below :data:`MIN_OUTPUT_SIDE`, which no DynOPool can produce exactly.
    """
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a list of {_SIZE_SHAPES[ndim]} sizes, got {type(sizes).__name__}")
    out = []
    for i, size in enumerate(sizes):
        pair = check_size(size, f"sizes[{i}]", ndims=(ndim,))
        if min(pair) < MIN_OUTPUT_SIDE:
            raise OptionError(
                f"sizes[{i}] = {pair} cannot be hit exactly: a DynOPool's output is at least {MIN_OUTPUT_SIDE} "
                "on each side"
            )
        out.append(pair)
    return out


def check_scale(value: Any, what: str, ndim: int = 2) -> tuple[float, ...]:
    """Return a scale (one number, or one per axis: (r_h, r_w) in 2-D) as ``ndim`` finite, positive floats.

    Raises:
        TypeError: Not a number or ``ndim`` numbers.
        OptionError: NaN, infinite, not > 0 or above :data:`MAX_SCALE`.
    """
    shape = "an (h, w) pair of numbers" if ndim == 2 else f"{ndim} numbers {_SIZE_SHAPES[ndim]}"
    values = (value,) * ndim if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if isinstance(values, (str, bytes, bool)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a number or {shape}, got {value!r}")
    scales = tuple(values)
    if len(scales) != ndim or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scales):
        raise TypeError(f"{what} must be a number or {shape}, got {value!r}")
    if not all(math.isfinite(v) and 0 < v <= MAX_SCALE for v in scales):
        raise OptionError(f"{what} must be finite, > 0 and at most {MAX_SCALE:g}, got {value!r}")
    return tuple(float(v) for v in scales)


def check_alpha(values: Sequence[float], what: str) -> None:
    """Refuse DynOPool alphas that are not finite or ask for more than :data:`MAX_SCALE` upsampling.

    Raises:
        ValueError: An alpha that is NaN, infinite, <= 0 or below ``1 / MAX_SCALE``.
    """
    if not all(math.isfinite(a) and a >= 1 / MAX_SCALE for a in values):
        raise ValueError(
            f"{what} is {list(values)}, but a DynOPool's alpha must be finite and at least {1 / MAX_SCALE:g} "
            f"(a scale of at most {MAX_SCALE:g})"
        )


def check_convert_args(model: Any, input_size: Any, sizes: Any = None) -> tuple[int, ...]:
    """Check ``dynoswap.convert``'s model and input size before any work; returns (L,), (H, W) or (T, H, W).

    An already converted model is refused by the engine itself (with its refusal category).

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module`` (e.g. a model name), or ``input_size``
            is not 1 to 3 integers.
        OptionError: A side below 1, or a target size below 2.
    """
    from torch import nn

    if not isinstance(model, nn.Module):
        hint = " (build it first, e.g. dynoswap.models.resolve(name)[0])" if isinstance(model, str) else ""
        raise TypeError(f"convert needs a torch.nn.Module, got {type(model).__name__} {model!r:.60}{hint}")
    size = check_size(input_size, "input_size", ndims=(1, 2, 3))
    check_input_budget(size, "input_size")
    if sizes is not None:
        check_target_sizes(sizes, len(size))
    return size


# -- the part of a model a conversion names ----------------------------------------------------
#: Longest submodule path ``convert(..., submodule=...)`` and a recipe accept.
MAX_SUBMODULE_CHARS = 200
#: A dotted path of ASCII identifiers or child indices (``backbone``, ``features.0``, ``model.backbone``).
_SUBMODULE_PATH = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+)(?:\.(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+))*")


def check_submodule_path(value: Any, what: str = "submodule") -> str:
    """Return a submodule path: dotted ASCII identifiers or child indices, at most :data:`MAX_SUBMODULE_CHARS`.

    Only the shape is checked; the path is resolved child by child on the model it names.

    Raises:
        OptionError: Not a string, empty, too long, or not a dotted path (``backbone``, ``features.0``).
    """
    if not isinstance(value, str):
        raise OptionError(f"{what} must be a dotted submodule path such as 'backbone', got {type(value).__name__}")
    if len(value) > MAX_SUBMODULE_CHARS:
        raise OptionError(f"{what} is {len(value)} characters long; a submodule path has at most {MAX_SUBMODULE_CHARS}")
    if not _SUBMODULE_PATH.fullmatch(value):
        raise OptionError(
            f"{what} must be a dotted submodule path of names or indices such as 'backbone' or 'features.0', "
            f"got {value!r:.80}"
        )
    return value


# -- a forward's memory, estimated before it runs ---------------------------------------------
#: Most activation memory one forward may ask for (estimated by :func:`dynoswap.cost.memory.estimate_forward_bytes`).
MAX_FORWARD_BYTES = 8 << 30
#: Side of the probe input the estimate runs at.
PROBE_SIDE = 64
