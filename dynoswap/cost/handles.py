"""fvcore op handles: DynOPool's own count (1-d, 2-d and 3-d).

fvcore counts by tracing with ``torch.jit`` and ignores the ops a DynOPool is
made of (index_select, lerp, max), so a DynOPool would silently cost 0. While
counting, each DynOPool runs as one opaque autograd Function, ``DynOPoolOp``,
which the trace records as ``prim::PythonOp.DynOPoolOp``; its handle counts
:data:`MACS_PER_OUTPUT` multiply-adds per output element of a DynOPool2d.

The count per output element: 4 query points per cell (eq. 2), each a bilinear
interpolation of 4 neighbours, i.e. 4 multiply-adds, so 16. This is fvcore's
own convention for ``aten::grid_sampler`` (4 per sampled point); the max over
the four queries is comparisons, not MACs. Per axis the same: ``2**d`` query points
of ``2**d`` neighbours each, ``4**d`` per output element (4 in 1-D, 64 in 3-D).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..layers import DynOPoolNd

#: Multiply-adds per DynOPool2d output element: 4 query points x 4 bilinear weights.
MACS_PER_OUTPUT = 16


def macs_per_output(ndim: int) -> int:
    """Multiply-adds per output element of a DynOPool over ``ndim`` axes: ``2**d`` points x ``2**d`` weights."""
    return 4**ndim


#: The name fvcore gives the traced op (``prim::PythonOp.<Function class name>``).
DYNOPOOL_OP = "prim::PythonOp.DynOPoolOp"

_RUNNING: list[Callable[[torch.Tensor], torch.Tensor]] = []


class DynOPoolOp(torch.autograd.Function):
    """A DynOPool forward seen by the jit tracer as a single op (counting only, no backward)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D102
        # The inner ops must not enter the trace: they would be counted (or
        # reference values the PythonOp cannot see).
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)  # type: ignore[attr-defined]
        try:
            with torch.no_grad():
                return _RUNNING[-1](x)
        finally:
            torch._C._set_tracing_state(state)  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx, grad_out):  # noqa: D102
        raise RuntimeError("DynOPoolOp exists for counting only; it has no backward")


def dynopool_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Count for fvcore: :func:`macs_per_output` per element of the (N, C, *spatial) output."""
    shape = outputs[0].type().sizes()
    return macs_per_output(len(shape) - 2) * int(torch.tensor(shape).prod().item())


#: Handles added to fvcore's defaults while counting.
HANDLES: dict[str, Callable[[list[Any], list[Any]], int]] = {DYNOPOOL_OP: dynopool_flop_jit}


def _opaque_forward(forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # An optional straight-through input size only chains gradients; the output is the same.
        _RUNNING.append(forward)
        try:
            return DynOPoolOp.apply(x)
        finally:
            _RUNNING.pop()

    return run


@contextlib.contextmanager
def opaque_dynopools(model: nn.Module) -> Iterator[None]:
    """Within the block, every DynOPool (any dimension) of ``model`` runs as one ``DynOPoolOp``."""
    patched = [m for m in model.modules() if isinstance(m, DynOPoolNd)]
    for m in patched:
        m.forward = _opaque_forward(m.forward)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in patched:
            del m.forward
