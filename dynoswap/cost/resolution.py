"""Resolution graph: every tensor's spatial size as an expression over the input size.

Recorded once per model by shape propagation at a reference input size. Each
4D tensor of the traced graph gets one of four expressions:

- ``input``: the input size;
- ``dynopool``: a DynOPool2d's output, ``size_st(parent)`` at its current alpha;
- ``scaled``: a remaining fixed resizer (a strided conv or pool the model kept),
  exact for Conv2d / MaxPool2d / AvgPool2d, else a fixed ratio rounded half up;
- ``const``: a size that does not follow the input (global or adaptive pooling).

Tensors of equal expression share one node (a stride-1 conv keeps its input's
node), and tied DynOPools fed the same tensor share one node too, so a ResNet-50
has a handful of nodes. Evaluating the nodes from the alphas gives integer
sizes with a straight-through gradient that chains: a layer behind two DynOPools
has size ``round(round(H r1) r2)`` and sends gradient to both alphas.

Each MAC-bearing layer's count (fvcore, at the reference size) is stored as a
cost per output pixel of its node, so the cost of any state of the alphas is
``sum(c * h * w) + const`` (paper eq. 7).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..layers import MIN_SIZE, DynOPool2d
from .count import FUNCTIONAL, count_gmacs, example_input

#: Modules and functions whose output size is fixed, whatever the input (global pooling).
CONST_MODULES: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
CONST_FUNCTIONS: set[Callable[..., Any]] = {
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.nn.functional.adaptive_max_pool2d_with_indices,
}

#: fvcore counts these per *input* element, so their cost follows the input's size.
COST_FOLLOWS_INPUT: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool2d,)

#: Functional ops fvcore counts (outside any module): MACs from the node's input shape.
FUNCTIONAL_COSTS: dict[Callable[..., Any], Callable[[torch.Tensor], int]] = {
    F.adaptive_avg_pool2d: lambda x: x.numel(),
}

INPUT, DYNOPOOL, SCALED, CONST = "input", "dynopool", "scaled", "const"

SizeRule = Callable[[int], int]


def _sliding_rule(kernel: int, stride: int, padding: int, dilation: int, ceil_mode: bool) -> SizeRule:
    """PyTorch's output-length formula for convolutions and pools along one axis."""

    def rule(n: int) -> int:
        span = n + 2 * padding - dilation * (kernel - 1) - 1
        if ceil_mode:
            out = -(-span // stride) + 1
            # PyTorch drops a last window that would start in the padding.
            if (out - 1) * stride >= n + padding:
                out -= 1
            return out
        return span // stride + 1

    return rule


def _axis(value: Any, axis: int) -> int:
    return int(value[axis] if isinstance(value, (tuple, list)) else value)


def _sliding_rules(m: nn.Module) -> tuple[SizeRule, SizeRule] | None:
    if isinstance(m.padding if hasattr(m, "padding") else 0, str):
        return None  # "same"/"valid" convs keep or shrink by a fixed amount: the ratio fallback is fine
    dilation = getattr(m, "dilation", 1)
    ceil_mode = bool(getattr(m, "ceil_mode", False))
    return tuple(  # type: ignore[return-value]
        _sliding_rule(
            _axis(m.kernel_size, a),
            _axis(m.stride if m.stride is not None else m.kernel_size, a),
            _axis(m.padding, a),
            _axis(dilation, a),
            ceil_mode,
        )
        for a in (0, 1)
    )


#: Exact integer size rules of fixed resizers, by module type.
SIZE_RULES: dict[type[nn.Module], Callable[[nn.Module], tuple[SizeRule, SizeRule] | None]] = {
    nn.Conv2d: _sliding_rules,
    nn.MaxPool2d: _sliding_rules,
    nn.AvgPool2d: _sliding_rules,
}


@dataclass
class ResNode:
    """One spatial-size expression.

    Attributes:
        kind: ``"input"``, ``"dynopool"``, ``"scaled"`` or ``"const"``.
        parent: Index of the parent node (-1 for input and const).
        size: Integer (h, w) at the reference input size and the alphas at recording.
        module: The DynOPool2d (kind ``dynopool``).
        ratio: Output / input length per axis (kind ``scaled``): the gradient.
        rules: Exact integer size per axis (kind ``scaled``); None: round the ratio.
    """

    kind: str
    parent: int = -1
    size: tuple[int, int] = (0, 0)
    module: DynOPool2d | None = None
    ratio: tuple[float, float] = (1.0, 1.0)
    rules: tuple[SizeRule, SizeRule] | None = None


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
        input_size: The reference (H, W).
        nodes: Size expressions in topological order; node 0 is the input.
        dynopools: DynOPool2d module name -> node of its output, in execution order.
        dynopool_inputs: DynOPool2d module name -> node of its input.
        layers: Cost of every MAC-bearing layer.
        const_gmacs: GMACs that do not depend on any size (after global pooling).
        reference_gmacs: fvcore's total at the reference state.
    """

    input_size: tuple[int, int]
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
        """Size (h, w) of every node from the current alphas.

        Args:
            input_size: Input (H, W); default: the reference size.
            relaxed: Drop every rounding (the continuous relaxation, for checks).
            dtype: Floating dtype of the sizes.

        Returns:
            One (2,) tensor per node: integer values with a straight-through
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
                    value = torch.clamp_min(parent / alpha, MIN_SIZE)
                else:
                    value = node.module.size_st(parent)
            elif node.kind == SCALED:
                parent = sizes[node.parent]
                cont = parent * torch.tensor(node.ratio, dtype=dtype, device=device)
                if relaxed:
                    value = cont
                else:
                    ints = [int(v) for v in parent.detach().round().tolist()]
                    if node.rules is not None:
                        exact = [float(rule(n)) for rule, n in zip(node.rules, ints, strict=True)]
                    else:
                        exact = [math.floor(n * r + 0.5) for n, r in zip(ints, node.ratio, strict=True)]
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

    def int_sizes(self, input_size: Sequence[int] | None = None) -> list[tuple[int, int]]:
        """Integer (h, w) of every node, no gradient."""
        with torch.no_grad():
            return [(int(s[0]), int(s[1])) for s in self.evaluate(input_size)]

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
        area = torch.stack([sizes[i][0] * sizes[i][1] for i in index])
        return (coef.to(area.device) * area).sum() + self.const_gmacs


# -- recording ----------------------------------------------------------------
class _LeafDynOPoolTracer(fx.Tracer):
    """Symbolic tracer keeping DynOPool2d whole (a call_module node)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, DynOPool2d) or super().is_leaf_module(m, module_qualified_name)


def _graph_of(model: nn.Module) -> fx.Graph:
    if isinstance(model, fx.GraphModule):
        return model.graph
    try:
        return _LeafDynOPoolTracer().trace(model)
    except Exception as exc:  # fx raises many kinds; one message says what to do
        raise ValueError(
            f"cannot trace {type(model).__name__} with torch.fx to record its resolution graph ({exc}); "
            "convert it with dynoswap.convert() first"
        ) from exc


class _Recorder(fx.Interpreter):
    """Shape propagation that builds the resolution graph as it runs."""

    def __init__(self, module: nn.Module, graph: fx.Graph, input_size: tuple[int, int]) -> None:
        super().__init__(module, graph=graph)
        self.res = ResolutionGraph(input_size=input_size, nodes=[ResNode(INPUT, size=input_size)])
        self.expr: dict[fx.Node, int] = {}
        self.shapes: dict[fx.Node, torch.Size] = {}
        self._interned: dict[tuple[Any, ...], int] = {}

    def _node(self, key: tuple[Any, ...], make: Callable[[], ResNode]) -> int:
        if key not in self._interned:
            self.res.nodes.append(make())
            self._interned[key] = len(self.res.nodes) - 1
        return self._interned[key]

    def _inputs(self, n: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) if a in self.expr else None)
        return found

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n] = out.shape
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            return out
        size = (int(out.shape[-2]), int(out.shape[-1]))
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None  # type: ignore[arg-type]
        inputs = self._inputs(n)
        if n.op == "placeholder":
            self.expr[n] = 0
        elif isinstance(module, DynOPool2d):
            parent = self.expr[inputs[0]] if inputs else 0
            leader = module.leader
            self.expr[n] = self._node(("dynopool", id(leader), parent), lambda: ResNode(DYNOPOOL, parent, size, module))
            self.res.dynopools.setdefault(str(n.target), self.expr[n])
            self.res.dynopool_inputs.setdefault(str(n.target), parent)
        elif (
            not inputs or isinstance(module, CONST_MODULES) or (n.op == "call_function" and n.target in CONST_FUNCTIONS)
        ):
            self.expr[n] = self._node(("const", size), lambda: ResNode(CONST, size=size))
        else:
            same = [self.expr[a] for a in inputs if tuple(self.shapes[a][-2:]) == size]
            if same:
                self.expr[n] = same[0]
            else:
                parent = self.expr[inputs[0]]
                n_in = self.shapes[inputs[0]][-2:]
                ratio = (size[0] / n_in[0], size[1] / n_in[1])
                make_rules = SIZE_RULES.get(type(module)) if module is not None else None
                rules = make_rules(module) if make_rules is not None else None
                key = ("scaled", parent, str(n.target) if rules is not None else ratio)
                self.expr[n] = self._node(key, lambda: ResNode(SCALED, parent, size, ratio=ratio, rules=rules))
        return out


def _owner(name: str, targets: dict[str, list[fx.Node]]) -> str | None:
    """Find the call_module target that runs leaf module ``name`` (itself, or an fx leaf containing it)."""
    while True:
        if name in targets:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]


def _attribute_costs(rec: _Recorder, graph: fx.Graph, model: nn.Module) -> None:
    res = rec.res
    count = count_gmacs(model, res.input_size)
    res.reference_gmacs = count.total
    targets: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            targets.setdefault(str(n.target), []).append(n)
    const = 0.0
    functional = count.by_layer.get(FUNCTIONAL, 0.0)
    for name, gmacs in count.by_layer.items():
        owner = _owner(name, targets) if name != FUNCTIONAL else None
        if owner is None:
            if name != FUNCTIONAL:
                const += gmacs
            continue
        module = model.get_submodule(name)
        sites = []
        for n in targets[owner]:
            follows_input = isinstance(module, COST_FOLLOWS_INPUT) and rec._inputs(n)
            site = rec._inputs(n)[0] if follows_input else n
            node = rec.expr.get(site)
            if node is not None and res.nodes[node].kind != CONST:
                sites.append(node)
        if not sites:
            const += gmacs
            continue
        # One module called at several places: the same cost per pixel at each.
        pixels = sum(res.nodes[i].size[0] * res.nodes[i].size[1] for i in sites)
        for i in sites:
            share = gmacs * res.nodes[i].size[0] * res.nodes[i].size[1] / pixels
            res.layers.append(LayerCost(name, i, gmacs / pixels, share))
    # Functional ops fvcore counts outside modules (e.g. a global average pool).
    for n in graph.nodes:
        cost_fn = FUNCTIONAL_COSTS.get(n.target) if n.op == "call_function" else None  # type: ignore[arg-type]
        inputs = rec._inputs(n) if cost_fn is not None else []
        if not inputs or rec.res.nodes[rec.expr[inputs[0]]].kind == CONST:
            continue
        node = rec.expr[inputs[0]]
        h, w = res.nodes[node].size
        gmacs = cost_fn(torch.empty(rec.shapes[inputs[0]], device="meta")) / 1e9  # type: ignore[misc]
        res.layers.append(LayerCost(n.name, node, gmacs / (h * w), gmacs))
        functional -= gmacs
    res.const_gmacs = const + max(functional, 0.0)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside DataParallel / DDP / torch.compile wrappers (the one that was converted)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


_CACHE: weakref.WeakKeyDictionary[nn.Module, ResolutionGraph] = weakref.WeakKeyDictionary()


def reference_input_size(model: nn.Module) -> tuple[int, int] | None:
    """Read the input size a converted model was built for (``gm.meta["dynoswap"]["input_size"]``)."""
    meta = getattr(model, "meta", None)
    recipe = meta.get("dynoswap") if isinstance(meta, dict) else None
    size = recipe.get("input_size") if isinstance(recipe, dict) else None
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def resolution_graph(
    model: nn.Module, input_size: int | Sequence[int] | None = None, refresh: bool = False
) -> ResolutionGraph:
    """Record (once, then cached per model) the resolution graph and per-layer costs.

    Recording runs the model twice at the reference size, batch 1, in eval mode:
    one shape-propagation pass over its torch.fx graph and one fvcore count.
    The alphas at recording time define the reference state of eq. 7; later
    changes to alphas are read live at evaluation.

    Args:
        model: A converted GraphModule, or any model torch.fx can trace
            (DynOPool2d is kept as a leaf).
        input_size: Reference (H, W); default: the one the model was converted at.
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
    elif isinstance(input_size, int):
        size = (input_size, input_size)
    else:
        size = (int(input_size[0]), int(input_size[1]))
    graph = _graph_of(model)
    from .count import eval_mode

    rec = _Recorder(model, graph, size)
    with eval_mode(model), torch.no_grad():
        rec.run(example_input(model, size))
    _attribute_costs(rec, graph, model)
    _CACHE[model] = rec.res
    return rec.res
