"""Tie DynOPool scales so tensors that meet keep equal resolutions for every alpha.

Each tensor's resolution is a symbolic expression over the input:

* ``("in",)`` the model input,
* ``("pool", site, parent)`` a DynOPool site applied to ``parent``,
* ``("op", key, parent)`` a fixed size-changing op (valid conv, skipped resizer, ...),
* ``("const", shape)`` a size that does not follow the input (adaptive/global pools, parameters).

At every merge (add/sub/mul/div of equal-sized tensors, concatenation along channels) the
operands' expressions are unified; equal ``pool`` nodes force their sites into one union-find
group and their parents to be equal, recursively. Each group then shares one alpha.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from .find import node_label
from .report import ConversionError

Expr = tuple


class TieError(ConversionError):
    """Two tensors must keep equal resolutions but no tying of scales can guarantee it."""


MERGE_FUNCTIONS: set[Any] = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.imul,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
}
MERGE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
CAT_FUNCTIONS: set[Any] = {torch.cat, torch.concat, torch.concatenate}
# Layout ops move dimensions around but keep the resolution.
LAYOUT_METHODS = {
    "permute",
    "transpose",
    "contiguous",
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "unsqueeze",
    "squeeze",
    "chunk",
    "split",
    "to",
    "float",
    "type_as",
}
LAYOUT_FUNCTIONS: set[Any] = {
    torch.permute,
    torch.transpose,
    torch.reshape,
    torch.flatten,
    torch.unsqueeze,
    torch.squeeze,
    torch.chunk,
    torch.split,
}
CONST_METHODS = {"mean", "amax", "sum", "max", "std", "var"}
CONST_FUNCTIONS: set[Any] = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, torch.amax, torch.sum}
CONST_MODULES: tuple[type, ...] = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


@functools.cache
def const_modules() -> tuple[type, ...]:
    """Return the module types whose output size is fixed (timm's SelectAdaptivePool2d added lazily)."""
    try:
        from timm.layers import SelectAdaptivePool2d
    except ImportError:
        return CONST_MODULES
    return (*CONST_MODULES, SelectAdaptivePool2d)


def node_shape(node: fx.Node) -> tuple[int, ...] | None:
    """Shape recorded by shape propagation, or None when the node is not a tensor."""
    shape = node.meta.get("dynoswap_shape")
    return tuple(int(s) for s in shape) if shape is not None else None


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []

    def visit(a: Any) -> None:
        if isinstance(a, fx.Node):
            found.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                visit(b)

    visit(node.args)
    visit(tuple(node.kwargs.values()))
    return found


def _shape_origin(a: Any) -> fx.Node | None:
    """Find the tensor whose ``.shape`` / ``.size()`` a value was read from (through indexing), if any."""
    while isinstance(a, fx.Node):
        if a.op == "call_function" and a.target is getattr and a.args[1] == "shape":
            return a.args[0]
        if a.op == "call_method" and a.target == "size":
            return a.args[0]
        if a.op == "call_function" and a.target is operator.getitem:
            a = a.args[0]
            continue
        return None
    return None


def _size_origin(node: fx.Node) -> fx.Node | None:
    """For ``F.interpolate(x, size=<partner's shape>)``: the partner, whose resolution the output takes."""
    if node.op != "call_function" or node.target is not F.interpolate:
        return None
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("size")
    parts = size if isinstance(size, (list, tuple)) else [size]
    origins = {_shape_origin(p) for p in parts}
    return origins.pop() if len(origins) == 1 else None


class UnionFind:
    """Union-find over site indices."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:  # noqa: D102
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:  # noqa: D102
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)  # the earliest site leads

    def groups(self) -> list[list[int]]:
        """Return the groups in execution order of their leader, members in order."""
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return [out[k] for k in sorted(out)]


def describe(expr: Expr, names: list[str]) -> str:
    """Readable form of a resolution expression."""
    kind = expr[0]
    if kind == "in":
        return "input"
    if kind == "const":
        return f"fixed {tuple(expr[1])}"
    if kind == "pool":
        return f"{names[expr[1]]}({describe(expr[2], names)})"
    return f"{expr[1][0]}({describe(expr[2], names)})"


class Resolver:
    """Computes each node's resolution expression and unifies them at merges."""

    def __init__(self, gm: fx.GraphModule, site_of: dict[fx.Node, int], identity: set[fx.Node], names: list[str]):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.site_of = site_of
        self.identity = identity
        self.names = names
        self.uf = UnionFind(len(names))
        self.exprs: dict[fx.Node, Expr] = {}
        self.ref_shape: dict[fx.Node, tuple[int, ...] | None] = {}
        self.first_input = True

    # -- unification --------------------------------------------------------
    def unify(self, a: Expr, b: Expr) -> bool:
        """Make ``a`` and ``b`` equal for every alpha by tying sites; False when impossible."""
        if a is b:
            return True
        if a[0] != b[0]:
            return False
        if a[0] == "in":
            return True
        if a[0] == "const":
            return tuple(a[1]) == tuple(b[1])
        if a[0] == "pool":
            if not self.unify(a[2], b[2]):
                return False
            self.uf.union(a[1], b[1])
            return True
        return a[1] == b[1] and self.unify(a[2], b[2])

    # -- expressions --------------------------------------------------------
    def run(self) -> None:
        """Walk the graph once."""
        for node in self.gm.graph.nodes:
            self.exprs[node] = self._expr(node)
            shape = node_shape(node)
            parent = next((a for a in _tensor_args(node) if a in self.ref_shape), None)
            self.ref_shape[node] = shape if shape is not None else self.ref_shape.get(parent)

    def _parent(self, node: fx.Node) -> fx.Node | None:
        # The first operand whose size follows the input, else the first operand.
        args = [a for a in _tensor_args(node) if a in self.exprs]
        return next((a for a in args if self.exprs[a][0] != "const"), args[0] if args else None)

    def _expr(self, node: fx.Node) -> Expr:
        shape = node_shape(node)
        if node.op == "placeholder":
            if self.first_input:
                self.first_input = False
                return ("in",)
            return ("const", shape or ())
        if node.op == "get_attr":
            return ("const", shape or ())
        if node in self.site_of:
            return ("pool", self.site_of[node], self.exprs[self._parent(node)])
        size_of = node.meta.get("dynoswap_size_of")
        if size_of is not None:
            return self.exprs[size_of]
        if self._is_merge(node):
            return self._merge(node)
        origin = _size_origin(node)
        if origin is not None and origin in self.exprs:
            return self.exprs[origin]
        parent = self._parent(node)
        if parent is None:
            return ("const", shape or ())
        if node in self.identity or self._is_layout(node):
            return self.exprs[parent]
        pshape = self.ref_shape.get(parent)
        if self._is_const(node) and (shape is None or pshape is None or len(shape) < 3 or shape[-2:] != pshape[-2:]):
            # A reduction over the spatial dims (sums over other dims keep the resolution).
            return ("const", shape or ())
        if shape is None or self._keeps_resolution(node, shape, pshape):
            return self.exprs[parent]
        return ("op", self._key(node), self.exprs[parent])

    def _keeps_resolution(self, node: fx.Node, shape: tuple[int, ...], pshape: tuple[int, ...] | None) -> bool:
        if pshape is None or len(shape) < 3 or len(pshape) < 3:
            return False
        if len(shape) != len(pshape):  # reductions/reshapes over leading dims, e.g. a sum over radix groups
            return shape[-2:] == pshape[-2:]
        if node.op == "call_module" and isinstance(self.modules[node.target], (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            return shape[-2:] == pshape[-2:]
        # Channel-mixing ops change one dim: channels first (NCHW) or last (NHWC, e.g. nn.Linear).
        differ = [d for d in range(len(shape)) if shape[d] != pshape[d]]
        return differ in ([], [0], [1], [len(shape) - 1])

    def _key(self, node: fx.Node) -> tuple:
        if node.op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, nn.Conv2d):
                return ("conv", m.kernel_size, m.stride, str(m.padding), m.dilation)
            return (type(m).__name__, node.name)
        return (str(getattr(node.target, "__name__", node.target)), node.name)

    def _is_layout(self, node: fx.Node) -> bool:
        if node.op == "call_method":
            return node.target in LAYOUT_METHODS
        return node.op == "call_function" and node.target in LAYOUT_FUNCTIONS

    def _is_const(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.modules[node.target], const_modules())
        if node.op == "call_method":
            return node.target in CONST_METHODS
        return node.op == "call_function" and node.target in CONST_FUNCTIONS

    def _is_merge(self, node: fx.Node) -> bool:
        if node.op == "call_function":
            if node.target in CAT_FUNCTIONS:
                shape = node_shape(node)
                dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
                return shape is not None and len(shape) == 4 and dim in (1, -3)
            return node.target in MERGE_FUNCTIONS
        return node.op == "call_method" and node.target in MERGE_METHODS

    def _broadcast(self, operand: fx.Node, out_shape: tuple[int, ...] | None) -> bool:
        shape = self.ref_shape.get(operand)
        if shape is None or out_shape is None or len(shape) < 3:
            return True
        expr = self.exprs[operand]
        if expr[0] == "const":
            return 1 in shape[-2:]
        return shape[-2:] == (1, 1) and out_shape[-2:] != (1, 1)

    def _merge(self, node: fx.Node) -> Expr:
        out_shape = node_shape(node)
        operands = [a for a in _tensor_args(node) if a in self.exprs]
        live = [a for a in operands if not self._broadcast(a, out_shape)]
        if not live:
            return self.exprs[operands[0]] if operands else ("const", out_shape or ())
        first = live[0]
        for other in live[1:]:
            if not self.unify(self.exprs[first], self.exprs[other]):
                raise TieError(
                    f"'{node_label(node)}' combines '{node_label(first)}' (resolution "
                    f"{describe(self.exprs[first], self.names)}) with '{node_label(other)}' (resolution "
                    f"{describe(self.exprs[other], self.names)}): no tying of DynOPool scales keeps them equal "
                    "once alpha moves"
                )
        return self.exprs[first]


def find_merge_upsamples(gm: fx.GraphModule, upsample_of: Callable[[fx.Node], dict | None]) -> list[tuple]:
    """(upsample, partner, options) for every fixed-factor upsampling that feeds a merge.

    The partner is another operand of the merge defined before the upsampling node.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    found = []
    seen: set[fx.Node] = set()
    probe = Resolver(gm, {}, set(), [])
    for node in gm.graph.nodes:
        if not probe._is_merge(node):
            continue
        operands = _tensor_args(node)
        for op in operands:
            options = upsample_of(op)
            if options is None or op in seen:
                continue
            partners = [p for p in operands if p is not op and upsample_of(p) is None and order[p] < order[op]]
            partners = [p for p in partners if node_shape(p) is not None and node_shape(p)[-2:] == node_shape(op)[-2:]]
            if partners:
                seen.add(op)
                found.append((op, partners[0], options))
    return found
