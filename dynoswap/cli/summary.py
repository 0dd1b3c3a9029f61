"""What inspect and convert report about a model: GMACs, params, stage sizes, DynOPools, per-layer rows.

The JSON form is the CLI's machine-readable contract::

    {"model": str, "source": str, "input_size": [H, W], "gmacs": float, "params": int,
     "stages": [[h, w], ...], "dynopools": [{"name", "alpha", "scale", "in", "out", "group"}]}
"""

from __future__ import annotations

from collections.abc import Sequence
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
    input_size: tuple[int, ...]
    gmacs: float
    params: int
    stages: list[tuple[int, ...]]
    dynopools: list[dict[str, Any]] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)
    frozen: str | None = None  #: how a frozen model's sizes are fixed, e.g. "fixed at 48x40" or "learned ratios"
    submodule: str | None = None  #: the part these facts are about, when one part of the model was converted

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
            "frozen": self.frozen,
        }
        if self.submodule is not None:
            data["submodule"] = self.submodule
        if self.layers:
            data["layers"] = [
                {"name": r.name, "type": r.kind, "out_shape": list(r.out_shape or ()), "gmacs": r.gmacs}
                for r in self.layers
            ]
        return data


#: The fields of a summary that describe the model itself (recorded in a saved folder; see ``read_summary``).
RECORDED_FIELDS = ("input_size", "gmacs", "params", "stages", "dynopools")


def recorded_summary(summary: ModelSummary) -> dict[str, Any] | None:
    """Return what a saved folder records of a summary (None for a frozen model: its contract needs the recipe)."""
    if summary.frozen is not None or summary.layers:
        return None
    data = summary.to_dict()
    return {key: data[key] for key in RECORDED_FIELDS}


def from_recorded(data: dict[str, Any], name: str, source: str) -> ModelSummary:
    """Rebuild a summary from a saved folder's record (see :func:`dynoswap.io.recipe.read_summary`)."""
    return ModelSummary(
        model=name,
        source=source,
        input_size=(data["input_size"][0], data["input_size"][1]),
        gmacs=data["gmacs"],
        params=data["params"],
        stages=[(s[0], s[1]) for s in data["stages"]],
        dynopools=data["dynopools"],
    )


def frozen_contract(model: nn.Module) -> str | None:
    """Describe a frozen model's input-size contract (None for a model that is not frozen)."""
    from ..export.freeze import FROZEN_KEY, is_frozen
    from ..io.recipe import raw_recipe_of

    if not is_frozen(model):
        return None
    record = (raw_recipe_of(model) or {})[FROZEN_KEY]
    size = record.get("input_size")
    return "fixed at " + "x".join(map(str, size)) if record.get("mode") == "fixed" and size else "learned ratios"


def count_params(model: nn.Module) -> int:
    """Count parameters; a tied alpha counts once (``parameters()`` deduplicates)."""
    return sum(p.numel() for p in model.parameters())


def dynopool_rows(model: nn.Module, input_size: tuple[int, ...]) -> list[dict[str, Any]]:
    """One JSON row per DynOPool (name, alpha, scale, in, out, group), from ``dynoswap.alphas``."""
    from ..cost import alphas

    return [
        {
            "name": row["name"],
            "alpha": row["alpha"],
            "scale": [float(r) for r in row["scale"]],
            "in": [int(v) for v in row["in_size"]],
            "out": [int(v) for v in row["out_size"]],
            "group": row["group"],
        }
        for row in alphas(model, input_size)
    ]


def layer_rows(model: nn.Module, input_size: tuple[int, ...], depth: int, by_layer: dict[str, float]) -> list[LayerRow]:
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
    stages: list[tuple[int, ...]] | None = None,
    submodule: str | None = None,
) -> ModelSummary:
    """Count GMACs and params, find stage sizes and DynOPools of a model at ``input_size``.

    Args:
        model: Plain or converted model.
        input_size: (H, W).
        name: Model name to report.
        source: Source library to report.
        depth: Add per-layer rows down to this many dotted name levels.
        stages: Stage sizes when already known (they cost a trace to find).
        submodule: The part's path when ``model`` is the converted part of a whole model (its facts are the part's).
    """
    from ..cost import count_gmacs, resolution_graph, stage_sizes
    from ..layers import DynOPoolNd

    size = tuple(int(v) for v in input_size)
    count = count_gmacs(model, size) if depth else None
    if any(isinstance(m, DynOPoolNd) for m in model.modules()):
        # The recorded resolution graph already holds the count (eq. 7 equals fvcore's total).
        gmacs = float(resolution_graph(model, size).gmacs(size).detach()) if count is None else count.total
        pools = dynopool_rows(model, size)
    else:
        gmacs = (count or count_gmacs(model, size)).total
        pools = []
    return ModelSummary(
        submodule=submodule,
        frozen=frozen_contract(model),
        model=name,
        source=source,
        input_size=size,
        gmacs=float(gmacs),
        params=count_params(model),
        stages=stages if stages is not None else stage_sizes(model, size),
        dynopools=pools,
        layers=layer_rows(model, size, depth, count.by_layer) if count is not None and depth is not None else [],
    )
