"""stage_sizes: the feature-map size of every resolution stage (the paper's Table 1 column)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from ..layers import DynOPoolNd
from .count import infer_in_chans
from .reference import unwrap
from .resolution import ResolutionGraph, resolution_graph

if TYPE_CHECKING:
    from ..engine.report import ConversionReport


def _has_dynopools(model: nn.Module) -> bool:
    return any(isinstance(m, DynOPoolNd) for m in model.modules())


def stage_sizes(model: nn.Module, input_size: int | Sequence[int] | None = None) -> list[tuple[int, ...]]:
    """Input size, then the output size of each resolution stage in execution order.

    A stage is the output of one (merged) resizer: one entry per DynOPool, or per
    tie group of DynOPools fed the same tensor (ResNet's main branch and shortcut).
    Every resizer is listed, the last one too: VGG-16 at 224 gives
    ``[224,224] [112,112] [56,56] [28,28] [14,14] [7,7]`` (the paper's Table 1
    stops at the fourth pool's 14x14).

    For a model with DynOPools, sizes come from the current alphas through the
    resolution graph (no forward pass; recorded once at the model's reference
    input size, then evaluated at ``input_size``). A model without DynOPools is
    converted (a copy) with :func:`dynoswap.convert` to find its stages, and each
    stage reports the size the original resizers really produce (pooling floors,
    where DynOPool rounds: at odd sizes the two can differ by one).

    Args:
        model: A converted or plain model.
        input_size: (H, W), or one int; (L,) or (T, H, W) for a 1-D or 3-D model; default: the
            converted model's reference size.

    Returns:
        ``[(H, W), (h1, w1), ...]`` (one value per axis in every dimension).
    """
    model = unwrap(model)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    if not _has_dynopools(model):
        if input_size is None:
            raise ValueError("stage_sizes of a model without DynOPoolNd needs input_size=(H, W)")
        return plain_stage_sizes(model, tuple(int(v) for v in input_size))
    if input_size is None and not isinstance(model, fx.GraphModule):
        raise ValueError(f"stage_sizes of a {type(model).__name__} needs input_size=(H, W)")
    graph = resolution_graph(model, input_size)
    sizes = graph.int_sizes(input_size)
    return [sizes[0], *(sizes[node] for node in _stage_nodes(graph))]


def plain_stage_sizes(model: nn.Module, input_size: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Stages of a model without DynOPools, as its own resizers produce them at ``input_size``.

    Grouped like a converted model's (a copy is converted to find the tie groups). A model
    dynoswap cannot convert (a fixed position embedding, a fixed-size head) still gets its
    stages: one per resizer, in execution order, consecutive equal sizes once; an untraceable
    one gets its input size alone.
    """
    from ..engine import convert, find_resizers, trace
    from ..engine.convert import SHAPE_KEY, _reference_shapes
    from ..errors import ConversionError

    try:
        converted, report = convert(copy.deepcopy(model), input_size=input_size)
        return original_stage_sizes(converted, report)
    except ConversionError:
        pass
    stages = [input_size]
    try:
        gm = trace(model)
        _reference_shapes(gm, input_size, infer_in_chans(model, ndim=len(input_size)), _device(model))
    except ConversionError:
        return stages
    ndim = len(input_size)
    resizers, _ = find_resizers(gm, ndim)
    for r in resizers:
        shape = r.node.meta.get(SHAPE_KEY)
        if shape is not None and len(shape) == ndim + 2 and tuple(int(v) for v in shape[2:]) != stages[-1]:
            stages.append(tuple(int(v) for v in shape[2:]))
    return stages


def _device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def original_stage_sizes(converted: nn.Module, report: ConversionReport) -> list[tuple[int, ...]]:
    """Stages of the model *before* conversion, at the conversion's input size.

    The stages are those of ``converted`` (same grouping and order as
    :func:`stage_sizes`); each reports what its original resizers produced, as
    recorded in the conversion report.

    Args:
        converted: The GraphModule returned by :func:`dynoswap.convert`.
        report: The ConversionReport returned with it.

    Returns:
        ``[(H, W), (h1, w1), ...]``.
    """
    before = {r.dynopool: r.original_out for r in report.replacements}
    graph = resolution_graph(unwrap(converted), report.input_size)
    sizes = graph.int_sizes(report.input_size)
    return [
        tuple(report.input_size),
        *(before[name] or sizes[node] for node, name in _stage_nodes(graph).items()),
    ]


def _stage_nodes(graph: ResolutionGraph) -> dict[int, str]:
    """Resolution node -> first DynOPool producing it, in execution order (tied layers fed one tensor share a node)."""
    nodes: dict[int, str] = {}
    for name, node in graph.dynopools.items():
        nodes.setdefault(node, name)
    return nodes
