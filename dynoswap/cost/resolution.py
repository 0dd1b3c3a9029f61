"""Resolution graph: every tensor's spatial size as an expression over the input size.

Recorded once per model by shape propagation at a reference input size. Each
4D tensor of the traced graph gets one of four expressions:

- ``input``: the input size;
- ``dynopool``: a DynOPool2d's output, ``size_st(parent)`` at its current alpha;
- ``scaled``: a remaining fixed resizer (a strided conv or pool the model kept),
  exact for Conv2d / MaxPool2d / AvgPool2d, else ``a * n + b`` rounded half up
  (``a`` and ``b`` fitted from the reference and a probe size: a pad, an upsample);
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
from .count import count_gmacs, eval_mode, example_input

#: Modules and functions whose output size is fixed, whatever the input (global pooling).
CONST_MODULES: tuple[type[nn.Module], ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
CONST_FUNCTIONS: set[Callable[..., Any]] = {
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.nn.functional.adaptive_max_pool2d_with_indices,
}

INPUT, DYNOPOOL, SCALED, CONST = "input", "dynopool", "scaled", "const"

#: The probe run's input size relative to the reference. Larger, not smaller: a
#: smaller probe can leave late small maps unchanged (a stride-2 conv maps 3 and
#: 4 to 2; DynOPool clamps at 2), which would look like a fixed size.
PROBE_SCALE = 1.5

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
        ratio: d(output length) / d(input length) per axis (kind ``scaled``): the gradient.
        offset: Output length = ``ratio * input + offset`` before rounding (kind ``scaled``).
        rules: Exact integer size per axis (kind ``scaled``); None: round ``ratio * n + offset``.
    """

    kind: str
    parent: int = -1
    size: tuple[int, int] = (0, 0)
    module: DynOPool2d | None = None
    ratio: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)
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


class _Call(nn.Module):
    """One functional op of the graph as a module, so fvcore reports its MACs under its own name."""

    def __init__(self, op: str, target: Any) -> None:
        super().__init__()
        self.op, self.target = op, target

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


#: Prefix of the wrapper modules of functional ops.
CALL_PREFIX = "_dynoswap_call_"


def _instrumented(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """Copy the graph into a GraphModule sharing ``model``'s modules in which every functional op is a module call."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    owned: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("call_function", "call_method"):
            name = CALL_PREFIX + n.name
            owned[name] = _Call(n.op, n.target)
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            env[n] = new.create_node("call_module", name, args, kwargs, name=n.name)
            continue
        if n.op in ("call_module", "get_attr"):
            owned[n.target] = _get(model, n.target)
        env[n] = new.node_copy(n, lambda a: env[a])
    return fx.GraphModule(owned, new)


def _get(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _permuted(target: Any, n: fx.Node, pos: tuple[int, int]) -> tuple[int, int]:
    """Where the spatial dims go through a permute / transpose (NCHW <-> NHWC in ConvNeXt-style blocks)."""
    args = list(n.args[1:])
    if target in ("permute", torch.permute):
        dims = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
        dims = [d % 4 for d in dims]
        return dims.index(pos[0]), dims.index(pos[1])
    if target in ("transpose", torch.transpose) and len(args) == 2:
        a, b = (int(args[0]) % 4, int(args[1]) % 4)
        swap = {a: b, b: a}
        return swap.get(pos[0], pos[0]), swap.get(pos[1], pos[1])
    return pos


class _Shapes(fx.Interpreter):
    """Shape propagation: every tensor's shape, by node name."""

    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.shapes: dict[str, torch.Size] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.shapes[n.name] = out.shape
        return out


def _shapes_at(gm: fx.GraphModule, size: tuple[int, int], strict: bool = False) -> dict[str, torch.Size] | None:
    """Shapes of every node at input ``size``; None if the model fails there (unless ``strict``)."""
    run = _Shapes(gm)
    try:
        run.run(example_input(gm, size))
    except Exception:  # a model tied to one input size: the probe is optional
        if strict:
            raise
        return None
    return run.shapes


class _Builder:
    """Builds the resolution graph from the shapes of two runs (reference and probe sizes).

    The probe (1.5 times the reference size) tells sizes that follow the input from
    fixed ones (a global mean with ``keepdim``, an adaptive pool, interpolation to
    a fixed size) without a registry of such ops, and avoids taking two tensors
    for one resolution because their sizes coincide at the reference.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        size: tuple[int, int],
        shapes: dict[str, torch.Size],
        probe: dict[str, torch.Size] | None,
    ) -> None:
        self.gm = gm
        self.shapes = shapes
        self.probe = probe
        self.res = ResolutionGraph(input_size=size, nodes=[ResNode(INPUT, size=size)])
        self.expr: dict[fx.Node, int] = {}
        self.pos: dict[fx.Node, tuple[int, int]] = {}
        self._interned: dict[tuple[Any, ...], int] = {}
        for n in gm.graph.nodes:
            self._visit(n)

    def size(self, n: fx.Node, probe: bool = False) -> tuple[int, int] | None:
        shapes = self.probe if probe else self.shapes
        if shapes is None or n.name not in shapes or n not in self.pos:
            return None
        shape = shapes[n.name]
        return int(shape[self.pos[n][0]]), int(shape[self.pos[n][1]])

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((n.args, n.kwargs), lambda a: found.append(a) if a in self.expr else None)
        return found

    def _node(self, key: tuple[Any, ...], make: Callable[[], ResNode]) -> int:
        if key not in self._interned:
            self.res.nodes.append(make())
            self._interned[key] = len(self.res.nodes) - 1
        return self._interned[key]

    def _visit(self, n: fx.Node) -> None:
        shape = self.shapes.get(n.name)
        if shape is None or len(shape) != 4:
            return
        module = self.gm.get_submodule(n.target) if n.op == "call_module" else None  # type: ignore[arg-type]
        inputs = self.inputs(n)
        if n.op == "placeholder" or isinstance(module, DynOPool2d) or not inputs:
            self.pos[n] = (2, 3)
        else:
            pos = self.pos[inputs[0]]
            self.pos[n] = _permuted(module.target, n, pos) if isinstance(module, _Call) else pos
        size = self.size(n)
        assert size is not None
        if n.op == "placeholder":
            self.expr[n] = 0
        elif isinstance(module, DynOPool2d):
            parent = self.expr[inputs[0]] if inputs else 0
            key = ("dynopool", id(module.leader), parent)
            self.expr[n] = self._node(key, lambda: ResNode(DYNOPOOL, parent, size, module))
            self.res.dynopools.setdefault(str(n.target), self.expr[n])
            self.res.dynopool_inputs.setdefault(str(n.target), parent)
        elif not inputs or isinstance(module, CONST_MODULES) or self._fixed(n, module, inputs):
            self.expr[n] = self._node(("const", size), lambda: ResNode(CONST, size=size))
        else:
            same = [a for a in inputs if self.size(a) == size and self.size(a, True) == self.size(n, True)]
            if same:
                self.expr[n] = self.expr[same[0]]
                return
            parent_node = inputs[0]
            parent = self.expr[parent_node]
            n_in = self.size(parent_node)
            assert n_in is not None
            ratio, offset = self._affine(n, parent_node)
            make_rules = SIZE_RULES.get(type(module)) if module is not None else None
            rules = make_rules(module) if make_rules is not None else None
            key = ("scaled", parent, str(n.target) if rules is not None else (ratio, offset))
            self.expr[n] = self._node(
                key, lambda: ResNode(SCALED, parent, size, ratio=ratio, offset=offset, rules=rules)
            )

    def _affine(self, n: fx.Node, parent: fx.Node) -> tuple[tuple[float, float], tuple[float, float]]:
        """Fit ``out = a * in + b`` per axis from the reference and probe runs (``b = 0`` without a probe)."""
        out, inp = self.size(n), self.size(parent)
        out_p, inp_p = self.size(n, True), self.size(parent, True)
        assert out is not None and inp is not None
        ratio, offset = [], []
        for axis in range(2):
            if out_p is not None and inp_p is not None and inp_p[axis] != inp[axis]:
                a = (out[axis] - out_p[axis]) / (inp[axis] - inp_p[axis])
            else:
                a = out[axis] / inp[axis]
            ratio.append(a)
            offset.append(out[axis] - a * inp[axis])
        return (ratio[0], ratio[1]), (offset[0], offset[1])

    def _fixed(self, n: fx.Node, module: nn.Module | None, inputs: list[fx.Node]) -> bool:
        """Whether ``n`` has a size that does not follow its inputs'."""
        if isinstance(module, _Call) and module.target in CONST_FUNCTIONS:
            return True
        if module is not None and type(module) in SIZE_RULES:
            return False  # a conv or pool: its size follows its input by rule
        # A 1x1 map from a larger one is a global pool (a DynOPool never goes below 2).
        if self.size(n) == (1, 1) and any(self.size(a) != (1, 1) for a in inputs):
            return True
        # Kept its size in the probe while an input's size changed.
        if self.probe is None or self.size(n, True) != self.size(n):
            return False
        return any(self.size(a, True) != self.size(a) for a in inputs)

    def spatial(self, n: fx.Node) -> int | None:
        """Resolution node of ``n`` if it is a size-following 4D tensor."""
        node = self.expr.get(n)
        return None if node is None or self.res.nodes[node].kind == CONST else node


def _attribute_costs(b: _Builder) -> None:
    """Give each op's fvcore MACs, per pixel, to the resolution node its cost follows."""
    res, gm = b.res, b.gm
    count = count_gmacs(gm, res.input_size)
    res.reference_gmacs = count.total
    per_module: dict[str, float] = {}
    for leaf, gmacs in count.by_layer.items():
        per_module[leaf] = gmacs
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
    for leaf, gmacs in per_module.items():
        target = _owner(leaf, sites)
        places = [i for i in sites.get(target, []) if i >= 0] if target is not None else []
        if not places:
            const += gmacs
            continue
        # One module called at several places: the same cost per pixel at each.
        pixels = sum(res.nodes[i].size[0] * res.nodes[i].size[1] for i in places)
        for i in places:
            area = res.nodes[i].size[0] * res.nodes[i].size[1]
            res.layers.append(LayerCost(leaf, i, gmacs / pixels, gmacs * area / pixels))
    res.const_gmacs = const


def _owner(name: str, targets: dict[str, list[int]]) -> str | None:
    """Find the call_module target that runs leaf module ``name`` (itself, or an fx leaf containing it)."""
    while True:
        if name in targets:
            return name
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]


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

    Recording runs the model, batch 1, in eval mode: a shape-propagation pass
    over its torch.fx graph at the reference size and one at 1.5 times it (to tell
    sizes that follow the input from fixed ones), and one fvcore count in which
    each functional op is wrapped in a module, so every MAC lands on a graph node.
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
    gm = _instrumented(model, _graph_of(model))
    with eval_mode(model), torch.no_grad():
        shapes = _shapes_at(gm, size, strict=True)
        assert shapes is not None
        probe = _shapes_at(gm, (round(PROBE_SCALE * size[0]), round(PROBE_SCALE * size[1])))
    builder = _Builder(gm, size, shapes, probe)
    _attribute_costs(builder)
    _CACHE[model] = builder.res
    return builder.res
