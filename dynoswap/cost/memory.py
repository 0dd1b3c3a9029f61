"""A forward's memory, estimated before it runs: a small probe forward scaled to the asked size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..validate import MAX_FORWARD_BYTES, PROBE_SIDE
from .count import infer_in_chans


def estimate_forward_bytes(model: Any, input_size: Sequence[int], batch: int = 1) -> int | None:
    """Estimate the activation memory of one inference forward at ``input_size`` from a small probe forward.

    Runs the model (eval mode, no grad) on a ``PROBE_SIDE``-sided input (1, 2 or 3 axes), takes
    its largest module output and scales it by the area (length, volume) and the batch: three
    such tensors alive at once (a layer's input, its output, a skip). Returns None when the probe does not run (a model
    that only takes its own size): then the real forward reports its own error.
    """
    sides = tuple(int(v) for v in input_size)
    probe = tuple(min(side, PROBE_SIDE) for side in sides)
    largest = 0

    def hook(module: Any, args: Any, out: Any) -> None:
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    was = model.training
    model.eval()
    try:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, infer_in_chans(model, ndim=len(sides)), *probe, device=device))
    except Exception:  # noqa: BLE001 - the real forward reports its own error
        return None
    finally:
        model.train(was)
        for handle in handles:
            handle.remove()
    return int(3 * largest * math.prod(sides) / math.prod(probe) * batch)


def check_forward_budget(model: Any, input_size: Sequence[int], what: str, batch: int = 1) -> None:
    """Refuse a forward whose estimated activation memory passes :data:`MAX_FORWARD_BYTES`.

    Raises:
        ValueError: The estimate is over the limit (names ``what`` and the size).
    """
    estimate = estimate_forward_bytes(model, input_size, batch)
    if estimate is not None and estimate > MAX_FORWARD_BYTES:
        shown = "x".join(str(int(v)) for v in input_size)
        raise ValueError(
            f"{what} {shown} (batch {batch}) would need about {estimate / 2**30:.1f} GiB of activations in one "
            f"forward, more than the {MAX_FORWARD_BYTES / 2**30:.0f} GiB dynoswap allows; choose a smaller size"
        )
