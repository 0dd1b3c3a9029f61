"""Resolution graph: every feature map's size as an expression over the input size and the alphas.

Built from the one resolution analysis of the library (:mod:`dynoswap.graph`): the
model runs on the meta device at the reference size and in a few moved worlds
(other input sizes, each tie group's alpha moved on its own), and tensors whose
sizes agree in every world share one node. Each node is

- ``input``: the input size;
- ``dynopool``: a DynOPoolNd's output, ``size_st(parent)`` at its current alpha;
- ``scaled``: a remaining fixed resizer (a strided conv or pool the model kept),
  exact for Conv2d / MaxPool2d / AvgPool2d, else ``a * n + b`` rounded half up
  (``a`` and ``b`` read from the worlds: a pad, a fixed-factor upsampling);
- ``const``: a size that does not follow the input (global or adaptive pooling).

So a ResNet-50 has a handful of nodes, an upsampling that takes its partner's size
*is* its partner's node, and evaluating the nodes from the alphas gives integer
sizes with a straight-through gradient that chains: a layer behind two DynOPools
has size ``round(round(H r1) r2)`` and sends gradient to both alphas.

Each MAC-bearing layer's count (fvcore, at the reference size) is stored as a
cost per output pixel of its node, so the cost of any state of the alphas, at any
input size, is ``sum(c * h * w) + const`` (paper eq. 7).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import OptionError
from ..graph import SIZE_RULES, NodeFailure, Resolution, SizeRule, analyse, eval_mode, make_worlds, tensor_inputs
from ..graph.modal import graph_for
from ..layers import DynOPoolNd, continuous_size
from .count import count_gmacs, infer_in_chans
from .instrument import instrumented
from .reference import reference_input_size, unwrap

INPUT, DYNOPOOL, SCALED, CONST = "input", "dynopool", "scaled", "const"


@dataclass
class ResNode:
    """One spatial-size expression.

    Attributes:
        kind: ``"input"``, ``"dynopool"``, ``"scaled"`` or ``"const"``.
        parent: Index of the parent node (-1 for input and const).
        size: Integer size per axis at the reference input size and the alphas at recording.
        module: The DynOPoolNd (kind ``dynopool``).
        ratio: d(output length) / d(input length) per axis (kind ``scaled``): the gradient.
        offset: Output length = ``ratio * input + offset`` before rounding (kind ``scaled``).
        rules: Exact integer size per axis (kind ``scaled``); None: round ``ratio * n + offset``.
    """

    kind: str
    parent: int = -1
    size: tuple[int, ...] = (0, 0)
    module: DynOPoolNd | None = None
    ratio: tuple[float, ...] = (1.0, 1.0)
    offset: tuple[float, ...] = (0.0, 0.0)
    rules: tuple[SizeRule, ...] | None = None


@dataclass
class LayerCost:
    """A MAC-bearing layer: its node and its GMACs per pixel of that node at the reference state."""

    name: str
    node: int
    gmacs_per_pixel: float
    gmacs: float


@dataclass
class ResolutionGraph:
    """The recorded resolution graph of one model.

    Attributes:
        input_size: The reference spatial size: (L,), (H, W) or (T, H, W).
        nodes: Size expressions in topological order; node 0 is the input.
        dynopools: DynOPoolNd module name -> node of its output, in execution order.
        dynopool_inputs: DynOPoolNd module name -> node of its input.
        layers: Cost of every MAC-bearing layer.
        const_gmacs: GMACs that do not depend on any size (after global pooling).
        reference_gmacs: fvcore's total at the reference state.
    """

    input_size: tuple[int, ...]
    nodes: list[ResNode] = field(default_factory=list)
    dynopools: dict[str, int] = field(default_factory=dict)
    dynopool_inputs: dict[str, int] = field(default_factory=dict)
    layers: list[LayerCost] = field(default_factory=list)
    const_gmacs: float = 0.0
    reference_gmacs: float = 0.0
    _terms: tuple[list[int], torch.Tensor] | None = None

    # -- evaluation ------------------------------------------------------------
    def evaluate(
        self, input_size: Sequence[int] | None = None, relaxed: bool = False, dtype: torch.dtype = torch.float64
    ) -> list[torch.Tensor]:
        """Size (one value per axis) of every node from the current alphas.

        Args:
            input_size: Input spatial size; default: the reference size.
            relaxed: Drop every rounding (the continuous relaxation, for checks).
            dtype: Floating dtype of the sizes.

        Returns:
            One (ndim,) tensor per node: integer values with a straight-through
            gradient to every upstream alpha (or continuous values if ``relaxed``).
        """
        size_in = self.input_size if input_size is None else input_size
        device = self.device()
        sizes: list[torch.Tensor] = []
        for node in self.nodes:
            if node.kind == INPUT:
                value = torch.tensor([float(v) for v in size_in], dtype=dtype, device=device)
            elif node.kind == DYNOPOOL:
                parent = sizes[node.parent]
                assert node.module is not None
                alpha = node.module.alpha
                if relaxed:
                    value = continuous_size(parent, alpha, node.module.floor_gradient)
                else:
                    # In the dtype the layer's forward uses, so a size on a rounding tie agrees bit for bit.
                    value = node.module.size_st(parent.to(torch.promote_types(alpha.dtype, torch.float32)))
            elif node.kind == SCALED:
                parent = sizes[node.parent]
                cont = parent * torch.tensor(node.ratio, dtype=dtype, device=device)
                cont = cont + torch.tensor(node.offset, dtype=dtype, device=device)
                if relaxed:
                    value = cont
                else:
                    ints = [int(v) for v in parent.detach().round().tolist()]
                    if node.rules is not None:
                        exact = [float(rule(n)) for rule, n in zip(node.rules, ints, strict=True)]
                    else:
                        exact = [
                            math.floor(n * r + b + 0.5) for n, r, b in zip(ints, node.ratio, node.offset, strict=True)
                        ]
                    value = cont + (torch.tensor(exact, dtype=dtype, device=device) - cont).detach()
            else:
                value = torch.tensor([float(v) for v in node.size], dtype=dtype, device=device)
            sizes.append(value.to(dtype))
        return sizes

    def device(self) -> torch.device:
        """Where the alphas live (sizes are evaluated there)."""
        for node in self.nodes:
            if node.module is not None:
                return node.module.alpha.device
        return torch.device("cpu")

    def int_sizes(self, input_size: Sequence[int] | None = None) -> list[tuple[int, ...]]:
        """Integer size of every node (one value per axis), no gradient."""
        with torch.no_grad():
            return [tuple(int(v) for v in s) for s in self.evaluate(input_size)]

    def terms(self) -> tuple[list[int], torch.Tensor]:
        """Nodes that carry cost and their GMACs per pixel (summed over layers)."""
        if self._terms is None:
            per_node: dict[int, float] = {}
            for layer in self.layers:
                per_node[layer.node] = per_node.get(layer.node, 0.0) + layer.gmacs_per_pixel
            index = sorted(per_node)
            self._terms = (index, torch.tensor([per_node[i] for i in index], dtype=torch.float64))
        return self._terms

    def gmacs(self, input_size: Sequence[int] | None = None, relaxed: bool = False) -> torch.Tensor:
        """Cost of the current state in GMACs (eq. 7), differentiable w.r.t. every alpha."""
        sizes = self.evaluate(input_size, relaxed=relaxed)
        index, coef = self.terms()
        if not index:
            return torch.tensor(self.const_gmacs, dtype=torch.float64, device=self.device())
        area = torch.stack([sizes[i].prod() for i in index])
        return (coef.to(area.device) * area).sum() + self.const_gmacs


# -- building from the resolution analysis -------------------------------------------------
class _LeafDynOPoolTracer(fx.Tracer):
    """Symbolic tracer keeping DynOPoolNd whole (a call_module node)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, DynOPoolNd) or super().is_leaf_module(m, module_qualified_name)


def _graph_of(model: nn.Module) -> fx.Graph:
    graph = graph_for(model, training=False)  # costs are counted in eval mode
    if graph is not None:
        return graph
    try:
        return _LeafDynOPoolTracer().trace(model)
    except Exception as exc:  # fx raises many kinds; one message says what to do
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx to record its resolution graph ({exc}); "
            "convert it with dynoswap.convert() first"
        ) from exc


def _analyse(gm: fx.GraphModule, model: nn.Module, size: tuple[int, ...]) -> Resolution:
    """Run the analysis with every DynOPool group moved on its own; a model tied to one size gets one world."""
    leaders: dict[int, DynOPoolNd] = {}
    for m in model.modules():
        if isinstance(m, DynOPoolNd):
            leaders.setdefault(id(m.leader), m.leader)

    def alpha_of(name: str, module: DynOPoolNd) -> tuple[tuple[float, ...], Hashable]:
        return tuple(float(a) for a in module.alpha.detach().cpu().tolist()), id(module.leader)

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    chans = infer_in_chans(model, ndim=len(size))
    # Every group moved on its own; else (a model whose untied layers must agree) only the input size;
    # else (a model tied to one input size) the reference alone.
    for worlds in (make_worlds(size, list(leaders)), make_worlds(size, []), make_worlds(size, [])[:1]):
        try:
            return analyse(gm, worlds, alpha_of, chans, device)
        except NodeFailure as failure:
            if failure.world == 0:
                raise failure.cause from None  # the cause itself, re-raised without its wrapper
    raise AssertionError("unreachable: the reference world alone cannot fail in a moved world")


class _PinnedSize(Exception):
    """A DynOPool whose size the moved worlds could not move (its alpha holds an axis at the floor)."""


@contextmanager
def _alphas_at_conversion(model: nn.Module) -> Iterator[None]:
    """Set every DynOPool's alpha to its value at conversion (the recipe's init scale) for the duration.

    At those values the conversion's own analysis ran, so every size follows its alpha; other alphas
    (an axis squeezed to the floor in training) are restored afterwards.
    """
    recipe = getattr(model, "meta", {}).get("dynoswap") or {}
    init = {str(r["dynopool"]): r["init_scale"] for r in recipe.get("replacements") or [] if r.get("dynopool")}
    saved: dict[int, tuple[DynOPoolNd, torch.Tensor]] = {}
    for name, m in model.named_modules():
        if isinstance(m, DynOPoolNd) and id(m.leader) not in saved:
            saved[id(m.leader)] = (m.leader, m.leader.alpha.detach().clone())
            scale = init.get(name, (0.5,) * m.ndim)
            with torch.no_grad():
                # Through .data: the values come back unchanged below, so a forward recorded before (whose
                # backward saved alpha) stays valid; a copy_ on alpha itself would bump its version.
                m.leader.alpha.data.copy_(torch.tensor([1.0 / float(v) for v in scale], dtype=m.leader.alpha.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for leader, alpha in saved.values():
                leader.alpha.data.copy_(alpha)


class _Builder:
    """Turn the analysis's expressions into resolution nodes (feature maps, other ranks by their spatial axes)."""

    def __init__(self, gm: fx.GraphModule, res: Resolution, size: tuple[int, ...]) -> None:
        self.ndim = len(size)
        self.gm = gm
        self.res_ = res
        self.modules = dict(gm.named_modules())
        self.nodes_by_name = {n.name: n for n in gm.graph.nodes}
        self.res = ResolutionGraph(input_size=size, nodes=[ResNode(INPUT, size=size)])
        self._index: dict[tuple, int] = {("in",): 0}
        self.node_of: dict[fx.Node, int] = {}
        self._pool_module: dict[tuple, DynOPoolNd] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module" and isinstance(self.modules[str(n.target)], DynOPoolNd):
                self._pool_module.setdefault(res.exprs[n], self.modules[str(n.target)])  # type: ignore[arg-type,unused-ignore]
        for n in gm.graph.nodes:
            shapes = res.shapes.get(n)
            if shapes is None or len(shapes[0]) != self.ndim + 2 and not self._two(res.exprs[n]):
                # A tensor of another rank joins only by as many size-following axes as the input has:
                # a lambda layer's (N, 1, H, W, V) input to its positional Conv3d costs per pixel of its (H, W).
                continue
            index = self.index(res.exprs[n], shapes[0])
            if index is not None:
                self.node_of[n] = index
            if n.op == "call_module" and isinstance(self.modules[str(n.target)], DynOPoolNd):
                if index is None:  # its size did not move with its alpha: an axis sat at the 2-cell floor
                    raise _PinnedSize(str(n.target))
                inputs = [a for a in tensor_inputs(n) if a in self.node_of]
                self.res.dynopools.setdefault(str(n.target), self.node_of[n])
                self.res.dynopool_inputs.setdefault(str(n.target), self.node_of[inputs[0]] if inputs else 0)

    def _two(self, expr: tuple) -> bool:
        sig = self.res_.signature.get(expr)
        return sig is not None and len(sig[0]) == self.ndim

    def index(self, expr: tuple, shape: tuple[int, ...]) -> int | None:
        """Resolution node of an expression (made on first use)."""
        if expr in self._index:
            return self._index[expr]
        kind = expr[0]
        if kind == "const":
            node = ResNode(CONST, size=tuple(int(v) for v in shape[-self.ndim :]))
        elif not self._two(expr):
            return None
        else:
            parent_expr = expr[2]
            while parent_expr[0] != "in" and not self._two(parent_expr):
                parent_expr = parent_expr[2]
            parent = self.index(parent_expr, shape)
            assert parent is not None
            sig = self.res_.signature[expr]
            size = tuple(int(v) for v in sig[0])
            if kind == "pool":
                node = ResNode(DYNOPOOL, parent, size, module=self._pool_module[expr])
            else:
                ratio, offset = self._affine(sig, self._signature(parent_expr))
                op = self.nodes_by_name.get(expr[1])
                module = self.modules.get(str(op.target)) if op is not None and op.op == "call_module" else None
                make_rules = SIZE_RULES.get(type(module)) if module is not None else None
                rules = make_rules(module) if make_rules is not None and module is not None else None
                node = ResNode(SCALED, parent, size, ratio=ratio, offset=offset, rules=rules)
        self.res.nodes.append(node)
        self._index[expr] = len(self.res.nodes) - 1
        return self._index[expr]

    def _signature(self, expr: tuple) -> tuple:
        if expr[0] == "in":
            return tuple(w.input_size for w in self.res_.worlds)
        return self.res_.signature[expr]

    @staticmethod
    def _affine(out: tuple, inp: tuple) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Fit ``out = a * in + b`` per axis from the worlds (``b = 0`` when the input never moved)."""
        ratio, offset = [], []
        for axis in range(len(out[0])):
            a = out[0][axis] / inp[0][axis]
            for k in range(1, len(out)):
                if inp[k][axis] != inp[0][axis]:
                    a = (out[k][axis] - out[0][axis]) / (inp[k][axis] - inp[0][axis])
                    break
            ratio.append(a)
            offset.append(out[0][axis] - a * inp[0][axis])
        return tuple(ratio), tuple(offset)

    def spatial(self, n: fx.Node) -> int | None:
        """Resolution node of ``n`` if it is a size-following feature map."""
        node = self.node_of.get(n)
        return None if node is None or self.res.nodes[node].kind == CONST else node

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        """Tensor inputs of ``n``."""
        return [a for a in tensor_inputs(n) if a in self.res_.shapes]


def _attribute_costs(b: _Builder) -> None:
    """Give each op's fvcore MACs, per pixel, to the resolution node its cost follows."""
    res, gm = b.res, b.gm
    count = count_gmacs(gm, res.input_size)
    res.reference_gmacs = count.total
    sites: dict[str, list[int]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        # Cost follows the output's size, or an input's when the output does not
        # follow the input (a global pool counted per input element).
        node = b.spatial(n)
        if node is None:
            node = next((b.spatial(a) for a in b.inputs(n) if b.spatial(a) is not None), None)
        sites.setdefault(str(n.target), []).append(-1 if node is None else node)
    const = 0.0
    for leaf, gmacs in count.by_layer.items():
        target = _owner(leaf, sites)
        places = [i for i in sites.get(target, []) if i >= 0] if target is not None else []
        if not places:
            const += gmacs
            continue
        # One module called at several places: the same cost per pixel at each.
        pixels = sum(math.prod(res.nodes[i].size) for i in places)
        for i in places:
            area = math.prod(res.nodes[i].size)
            res.layers.append(LayerCost(leaf, i, gmacs / pixels, gmacs * area / pixels))
    res.const_gmacs = const


def _record(gm: fx.GraphModule, model: nn.Module, size: tuple[int, ...]) -> _Builder:
    with eval_mode(model), torch.no_grad():
        res = _analyse(gm, model, size)
    builder = _Builder(gm, res, size)
    _attribute_costs(builder)
    return builder


def _owner(name: str, targets: dict[str, list[int]]) -> str | None:
    """Find the call_module target that runs leaf module ``name`` (itself, or an fx leaf containing it)."""
    while True:
        if name in targets:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]


_CACHE: weakref.WeakKeyDictionary[nn.Module, ResolutionGraph] = weakref.WeakKeyDictionary()


def _size_tuple(input_size: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(input_size, int):
        return input_size, input_size
    return tuple(int(v) for v in input_size)


def resolution_graph(
    model: nn.Module, input_size: int | Sequence[int] | None = None, refresh: bool = False
) -> ResolutionGraph:
    """Record (once per model, then cached) the resolution graph and per-layer costs.

    Recording runs the resolution analysis (meta device, the reference size and a few
    moved worlds) and one fvcore count at the reference size, batch 1, eval mode, in
    which each functional op is wrapped in a module so every MAC lands on a graph node.
    The graph is valid at any input size and any alphas (both are read at evaluation):
    pass ``input_size`` to :meth:`ResolutionGraph.gmacs` / ``evaluate`` to get another size.

    Args:
        model: A converted GraphModule, or any model torch.fx can trace
            (DynOPoolNd is kept as a leaf).
        input_size: Reference spatial size ((L,), (H, W) or (T, H, W)) when recording; default: the one
            the model was converted at.
        refresh: Record again even if cached (after changing the model's structure).

    Returns:
        The :class:`ResolutionGraph`.
    """
    model = unwrap(model)
    if not refresh and model in _CACHE:
        return _CACHE[model]
    if input_size is None:
        size = reference_input_size(model)
        if size is None:
            raise ValueError(
                f"{type(model).__name__} has no reference input size: pass input_size=(H, W) "
                "(models from dynoswap.convert() carry theirs)"
            )
    else:
        size = _size_tuple(input_size)
    gm = instrumented(model, _graph_of(model))
    try:
        builder = _record(gm, model, size)
    except _PinnedSize:
        try:
            with _alphas_at_conversion(model):
                builder = _record(gm, model, size)
        except _PinnedSize as pinned:
            raise OptionError(
                f"input size {size} is too small to relate sizes to scales: DynOPool '{pinned}' outputs its "
                "2-cell floor whatever its alpha; use a larger input size"
            ) from pinned
    _CACHE[model] = builder.res
    return builder.res
