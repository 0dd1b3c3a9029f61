"""What inspect and convert report about a model: GMACs, params, stage sizes, DynOPools, per-layer rows.

The JSON form is the CLI's machine-readable contract::

    {"model": str, "source": str, "input_size": [H, W], "gmacs": float, "params": int,
     "stages": [[h, w], ...], "dynopools": [{"name", "alpha", "scale", "in", "out", "group"}]}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


@dataclass
class LayerRow:
    """One row of the per-layer table (``inspect --depth``)."""

    name: str
    kind: str
    out_shape: tuple[int, ...] | None
    gmacs: float


@dataclass
class ModelSummary:
    """A model's cost and shape facts at one input size."""

    model: str
    source: str
    input_size: tuple[int, int]
    gmacs: float
    params: int
    stages: list[tuple[int, int]]
    dynopools: list[dict[str, Any]] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (see the module docstring)."""
        data: dict[str, Any] = {
            "model": self.model,
            "source": self.source,
            "input_size": list(self.input_size),
            "gmacs": float(self.gmacs),
            "params": int(self.params),
            "stages": [list(s) for s in self.stages],
            "dynopools": self.dynopools,
        }
        if self.layers:
            data["layers"] = [
                {"name": r.name, "type": r.kind, "out_shape": list(r.out_shape or ()), "gmacs": r.gmacs}
                for r in self.layers
            ]
        return data


def count_params(model: nn.Module) -> int:
    """Count parameters; a tied alpha counts once (``parameters()`` deduplicates)."""
    return sum(p.numel() for p in model.parameters())


def _leader_names(model: nn.Module) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, m in model.named_modules():
        names.setdefault(id(m), name)
    return names


def _dynopools_during(model: nn.Module, input_size: tuple[int, int], run: Callable[[], Any]) -> tuple[Any, list, list]:
    """Call ``run`` (one forward pass of ``model``) and read stages and rows off its DynOPools."""
    from ..layers import DynOPool2d

    pools = {name: m for name, m in model.named_modules() if isinstance(m, DynOPool2d)}
    order: list[str] = []

    def record(name: str):
        def hook(_module: nn.Module, _inputs: Any) -> None:
            order.append(name)

        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in pools.items()]
    try:
        result = run()
    finally:
        for h in handles:
            h.remove()
    names = _leader_names(model)
    rows, stages, seen = [], [tuple(input_size)], set()
    for name in dict.fromkeys(order):  # first call of each layer, in execution order
        m = pools[name]
        in_size, out_size = tuple(m.last_in_size), tuple(m.last_out_size)
        rows.append(
            {
                "name": name,
                "alpha": [float(a) for a in m.alpha.detach().tolist()],
                "scale": [float(r) for r in m.scale],
                "in": [int(v) for v in in_size],
                "out": [int(v) for v in out_size],
                "group": names.get(id(m.leader), name),
            }
        )
        key = (id(m.leader), in_size)
        if key not in seen:
            seen.add(key)
            stages.append(out_size)
    return result, [(int(h), int(w)) for h, w in stages], rows


def counted_with_dynopools(
    model: nn.Module, input_size: tuple[int, int]
) -> tuple[Any, list[tuple[int, int]], list[dict]]:
    """GMACs count, stage sizes and DynOPool rows of a converted model from one counted forward pass.

    Stages follow ``dynoswap.cost.stage_sizes``: the input, then each DynOPool's output in
    execution order, once per tie group fed the same resolution (main branch and shortcut).
    Going through fvcore's single pass instead of recording the resolution graph (three
    passes) keeps the CLI fast; the test suite checks both give the same stages.

    Returns:
        (``GmacsCount``, stages, one dict per DynOPool: name, alpha, scale, in, out, group).
    """
    from ..cost import count_gmacs

    return _dynopools_during(model, input_size, lambda: count_gmacs(model, input_size))


def plain_stage_sizes(model: nn.Module, input_size: tuple[int, int]) -> list[tuple[int, int]]:
    """Stages of a model without DynOPools: those of its conversion at its own scales (as in ``dynoswap.cost``)."""
    import copy

    import torch

    from ..cost.count import eval_mode, example_input
    from ..engine import convert

    gm, _ = convert(copy.deepcopy(model), input_size=input_size)
    x = example_input(gm, input_size)

    def run() -> None:
        with eval_mode(gm), torch.no_grad():
            gm(x)

    return _dynopools_during(gm, input_size, run)[1]


def _depth_prefix(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def layer_rows(model: nn.Module, input_size: tuple[int, int], depth: int, by_layer: dict[str, float]) -> list[LayerRow]:
    """Per-module rows down to ``depth`` dotted levels: output shape and GMACs (children summed)."""
    import torch

    from ..cost.count import eval_mode, example_input

    wanted = {
        name: m
        for name, m in model.named_modules()
        if name and (name.count(".") + 1 == depth or (name.count(".") + 1 < depth and next(m.children(), None) is None))
    }
    shapes: dict[str, tuple[int, ...]] = {}

    def hook(name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                shapes[name] = tuple(output.shape)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in wanted.items()]
    try:
        with eval_mode(model), torch.no_grad():
            model(example_input(model, input_size))
    finally:
        for h in handles:
            h.remove()
    gmacs: dict[str, float] = {}
    for leaf, value in by_layer.items():
        for name in wanted:
            if leaf == name or leaf.startswith(name + "."):
                gmacs[name] = gmacs.get(name, 0.0) + value
                break
    return [LayerRow(n, type(m).__name__, shapes.get(n), gmacs.get(n, 0.0)) for n, m in wanted.items()]


def summarize(
    model: nn.Module,
    input_size: Sequence[int],
    name: str,
    source: str,
    depth: int | None = None,
    stages: list[tuple[int, int]] | None = None,
) -> ModelSummary:
    """Count GMACs and params, find stage sizes and DynOPools of a model at ``input_size``.

    Args:
        model: Plain or converted model.
        input_size: (H, W).
        name: Model name to report.
        source: Source library to report.
        depth: Add per-layer rows down to this many dotted name levels.
        stages: Stage sizes when already known (they cost a trace to find).
    """
    from ..cost import count_gmacs
    from ..layers import DynOPool2d

    size = (int(input_size[0]), int(input_size[1]))
    if any(isinstance(m, DynOPool2d) for m in model.modules()):
        count, found, pools = counted_with_dynopools(model, size)
        stages = stages if stages is not None else found
    else:
        count, pools = count_gmacs(model, size), []
        stages = stages if stages is not None else plain_stage_sizes(model, size)
    return ModelSummary(
        model=name,
        source=source,
        input_size=size,
        gmacs=float(count.total),
        params=count_params(model),
        stages=stages,
        dynopools=pools,
        layers=layer_rows(model, size, depth, count.by_layer) if depth else [],
    )
