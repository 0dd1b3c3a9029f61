"""count_gmacs: fvcore's multiply-add count, DynOPool layers included, per layer."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..graph.modal import graph_for
from ..graph.propagate import eval_mode
from ..layers import DynOPoolNd
from .handles import HANDLES, opaque_dynopools

#: Key of ``by_layer`` for MACs outside any leaf module (functional ops of a traced model).
FUNCTIONAL = "<functional>"


@dataclass
class GmacsCount:
    """A model's cost at one input size, as fvcore counts it (one multiply-add = one MAC).

    Attributes:
        total: GMACs of one forward pass of the whole batch.
        by_layer: GMACs of each module's own ops (not its children's), by module
            name, only modules that cost something; functional ops of the root
            module (a traced model's ``torch.flatten``, ``F.adaptive_avg_pool2d``)
            are under ``"<functional>"``.
        by_operator: GMACs per fvcore operator name.
        dynopool: GMACs of all DynOPool layers together.
        input_size: The (H, W) counted at ((L,) or (T, H, W) for 1-D and 3-D models).
        batch: The batch size counted at.
    """

    total: float
    by_layer: dict[str, float] = field(default_factory=dict)
    by_operator: dict[str, float] = field(default_factory=dict)
    dynopool: float = 0.0
    input_size: tuple[int, ...] = (0, 0)
    batch: int = 1

    @property
    def dynopool_share(self) -> float:
        """DynOPools' fraction of the total (supplement Table 3 reports it in percent)."""
        return self.dynopool / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-able summary."""
        return {
            "gmacs": self.total,
            "dynopool_gmacs": self.dynopool,
            "dynopool_share": self.dynopool_share,
            "input_size": list(self.input_size),
            "batch": self.batch,
            "by_layer": dict(self.by_layer),
        }


def _sides(input_size: int | Sequence[int]) -> tuple[int, ...]:
    """(H, W) from an int (a square) or 1-3 positive sides: (L,), (H, W) or (T, H, W)."""
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    size = tuple(int(v) for v in input_size)
    if len(size) not in CONV_TYPES or min(size) < 1:
        raise ValueError(
            f"input_size must be a positive int, an (H, W) pair, or (L,) / (T, H, W) for 1-D / 3-D models, "
            f"got {input_size!r}"
        )
    return size


#: The convolution of each number of spatial axes: what :func:`infer_in_chans` looks for.
CONV_TYPES: dict[int, type[nn.modules.conv._ConvNd]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def infer_in_chans(model: nn.Module, default: int = 3, ndim: int = 2) -> int:
    """Input channels: those of the first conv the model runs.

    For a traced model, the first conv of its (eval-mode) graph; otherwise the first registered
    ``nn.Conv2d`` (registration order need not be execution order in a GraphModule).

    Args:
        model: The model.
        default: Channels when the model has no such conv.
        ndim: Spatial axes of the input: the conv looked for is ``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``.
    """
    conv_type = CONV_TYPES[ndim]
    graph = graph_for(model, training=False)
    if graph is not None:
        modules = dict(model.named_modules())
        for node in graph.nodes:
            m = modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(m, conv_type):
                if m.in_channels != default and _reaches_with(model, graph, node, default, ndim) == m.in_channels:
                    return default  # a stem turns the default channels into the conv's (space-to-depth, a DCT)
                return m.in_channels
            if m is not None and not isinstance(m, DynOPoolNd):
                conv = next((c for c in m.modules() if isinstance(c, conv_type)), None)
                if conv is not None:
                    return conv.in_channels
    first = next((m for m in model.modules() if isinstance(m, conv_type)), None)
    return first.in_channels if first is not None else default


#: The probe input of :func:`_reaches_with` per number of spatial axes (a multiple of common strides).
_PROBE: dict[int, tuple[int, ...]] = {1: (256,), 2: (64, 64), 3: (8, 64, 64)}


def _reaches_with(model: nn.Module, graph: torch.fx.Graph, conv: torch.fx.Node, chans: int, ndim: int) -> int | None:
    """Return the channels that reach ``conv`` from a ``chans``-channel probe input, run on the meta device.

    None when the probe fails before it (an op that refuses the probe's size) or the conv is the first op.
    """
    from ..graph.propagate import MetaParams, NodeFailure, World, WorldRunner

    source = conv.args[0] if conv.args else None
    if (
        not isinstance(model, torch.fx.GraphModule)
        or not isinstance(source, torch.fx.Node)
        or source.op == "placeholder"
    ):
        return None
    probe: Any = _PROBE[ndim]
    unmoved: Any = lambda name, m: ((1.0,) * ndim, name)  # noqa: E731
    runner = WorldRunner(model, [World(probe)], unmoved, chans, torch.device("cpu"))
    runner.first_input = next(n for n in graph.nodes if n.op == "placeholder")  # this mode's graph
    try:
        with MetaParams(model) as meta, torch.no_grad():
            runner.meta = meta
            for node in graph.nodes:
                if node is conv:
                    value = runner.envs[0][source]
                    return int(value.shape[1]) if isinstance(value, torch.Tensor) else None
                runner.run_node(node, 0)
    except NodeFailure:
        return None
    return None


def example_input(
    model: nn.Module, input_size: tuple[int, ...], batch: int = 1, in_chans: int | None = None
) -> torch.Tensor:
    """Make a random (batch, C, *input_size) input on the model's device and dtype."""
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    chans = in_chans if in_chans is not None else infer_in_chans(model, ndim=len(input_size))
    return torch.randn(batch, chans, *input_size, device=device, dtype=dtype)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # fvcore's jit trace warns about every python int it sees (DynOPool sizes) and
    # logs skipped ops; neither says anything about the count.
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _own_counts(model: nn.Module, per_module: dict[str, int]) -> dict[str, int]:
    """MACs of each module's own ops: its subtree's count less its children's.

    A module with children can run ops itself (timm's BatchNormAct2d runs
    batch_norm and owns an activation), so leaves alone would miss them.
    """
    own: dict[str, int] = {}
    for name, m in model.named_modules(remove_duplicate=True):
        prefix = f"{name}." if name else ""
        children = sum(per_module.get(prefix + child, 0) for child, _ in m.named_children())
        own[name] = per_module.get(name, 0) - children
    return own


def count_gmacs(
    model: nn.Module,
    input_size: int | Sequence[int] = (224, 224),
    batch: int = 1,
    in_chans: int | None = None,
) -> GmacsCount:
    """Count a model's GMACs with fvcore, DynOPool layers (1-d, 2-d, 3-d) included.

    The model runs once in eval mode (each module's mode is restored afterwards)
    under ``torch.no_grad``. DynOPool layers count ``4**d`` (16 in 2-D) per output
    element (see :mod:`dynoswap.cost.handles`); ops fvcore has no handle for
    (activations, additions, max pooling) count 0, silently.

    Args:
        model: Any module taking one (N, C, H, W) tensor, converted or not (or (N, C, L) / (N, C, T, H, W)).
        input_size: (H, W) of the input, or one int for a square input; (L,) or (T, H, W) for 1-D and
            3-D models.
        batch: Batch size of the counted forward pass.
        in_chans: Input channels; default: those of the first conv.

    Returns:
        The :class:`GmacsCount`.
    """
    size = _sides(input_size)
    if len(size) != 2 and not any(isinstance(m, CONV_TYPES[len(size)]) for m in model.modules()):
        raise ValueError(
            f"input_size {size} has {len(size)} side(s), but the model has no {CONV_TYPES[len(size)].__name__}: "
            "give (H, W) for a 2-D model"
        )
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    x = example_input(model, size, batch, in_chans)
    with eval_mode(model), opaque_dynopools(model), torch.no_grad(), _quiet():
        from fvcore.nn import FlopCountAnalysis  # lazy: a heavy import, and it warns about torch.jit

        analysis = FlopCountAnalysis(model, x)
        analysis.set_op_handle(**HANDLES)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = analysis.total()
        per_module = analysis.by_module()
        per_op = analysis.by_operator()
    own = _own_counts(model, per_module)
    by_layer = {(name or FUNCTIONAL): macs / 1e9 for name, macs in own.items() if macs}
    modules = dict(model.named_modules())
    dynopool = sum(macs for name, macs in own.items() if isinstance(modules[name], DynOPoolNd))
    return GmacsCount(
        total=total / 1e9,
        by_layer=by_layer,
        by_operator={k: v / 1e9 for k, v in per_op.items()},
        dynopool=dynopool / 1e9,
        input_size=size,
        batch=batch,
    )
