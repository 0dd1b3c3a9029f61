"""stage_sizes: the feature-map size of every resolution stage (the paper's Table 1 column)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import fx, nn

from ..layers import DynOPool2d
from .resolution import resolution_graph, unwrap


def _has_dynopools(model: nn.Module) -> bool:
    return any(isinstance(m, DynOPool2d) for m in model.modules())


def stage_sizes(model: nn.Module, input_size: int | Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Input size, then the output size of each resolution stage in execution order.

    A stage is the output of one (merged) resizer: one entry per DynOPool, or per
    tie group of DynOPools fed the same tensor (ResNet's main branch and shortcut).
    Every resizer is listed, the last one too: VGG-16 at 224 gives
    ``[224,224] [112,112] [56,56] [28,28] [14,14] [7,7]`` (the paper's Table 1
    stops at the fourth pool's 14x14).

    For a model with DynOPools, sizes come from the current alphas through the
    resolution graph (no forward pass; recorded once at the model's reference
    input size, then evaluated at ``input_size``). A model without DynOPools is
    first converted (a copy, at its own scales) with :func:`dynoswap.convert`,
    so its stages are exactly those of the converted model at init.

    Args:
        model: A converted or plain model.
        input_size: (H, W), or one int; default: the converted model's reference size.

    Returns:
        ``[(H, W), (h1, w1), ...]``.
    """
    model = unwrap(model)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if not _has_dynopools(model):
        if input_size is None:
            raise ValueError("stage_sizes of a model without DynOPool2d needs input_size=(H, W)")
        from ..engine import convert

        model, _ = convert(copy.deepcopy(model), input_size=tuple(input_size))
    elif input_size is None and not isinstance(model, fx.GraphModule):
        raise ValueError(f"stage_sizes of a {type(model).__name__} needs input_size=(H, W)")
    graph = resolution_graph(model, input_size)
    sizes = graph.int_sizes(input_size)
    stages = [sizes[0]]
    seen: set[int] = set()
    for node in graph.dynopools.values():
        if node not in seen:
            seen.add(node)
            stages.append(sizes[node])
    return stages
