"""Every tensor's resolution as an expression over the input and the DynOPool sites.

The one place that knows resolutions: the engine ties DynOPool scales with it and the
cost model evaluates sizes with it. Expressions are found by running the model in
several :class:`~dynoswap.graph.propagate.World` s (input sizes and per-group alpha
multipliers), not from a table of ops:

* ``("in",)`` the model input;
* ``("pool", key, parent)`` a DynOPool (``key`` names its site or tie group) on ``parent``;
* ``("op", node, parent)`` any other op whose output size follows ``parent`` but differs from it
  (a kept strided conv, a pad, a fixed-factor upsampling);
* ``("const", shape)`` a size that does not follow the input (global pools, parameters, gates).

Which dimensions of a tensor are spatial is read from the worlds (the ones that differ);
two tensors whose spatial sizes agree in every world share one expression, whatever ops
lie between them (a stride-1 pool after a pad, a ``same`` conv, a transpose to NHWC).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..layers import DynOPoolNd
from .propagate import Alpha, MetaParams, NodeFailure, World, WorldRunner, shape_of, spatial_dims

Expr = tuple
IN: Expr = ("in",)
FailureHandler = Callable[["Resolution", WorldRunner, NodeFailure], None]


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Nodes among the args and kwargs of ``node``, in order, each once."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) if a not in found else None)
    return found


def node_label(node: fx.Node) -> str:
    """Readable name of a node: its module path, or ``scope.node_name`` for a function call."""
    if node.op in ("call_module", "get_attr"):
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    scope = next(reversed(stack.values()))[0] if stack else ""
    scope = scope if isinstance(scope, str) else ""
    return f"{scope}.{node.name}" if scope else node.name


class UnionFind:
    """Union-find over hashable keys; the first key seen leads its group."""

    def __init__(self, keys: Sequence[Hashable] = ()) -> None:
        self.parent: dict[Hashable, Hashable] = {k: k for k in keys}
        self.order: dict[Hashable, int] = {k: i for i, k in enumerate(keys)}

    def find(self, key: Hashable) -> Hashable:  # noqa: D102
        if key not in self.parent:
            self.parent[key] = key
            self.order[key] = len(self.order)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: Hashable, b: Hashable) -> bool:
        """Join the groups of ``a`` and ``b``; True if they were apart."""
        a, b = self.find(a), self.find(b)
        if a == b:
            return False
        first, second = (a, b) if self.order[a] <= self.order[b] else (b, a)
        self.parent[second] = first
        return True

    def groups(self) -> list[list[Hashable]]:
        """Return the groups in order of their first member, members in order."""
        out: dict[Hashable, list[Hashable]] = {}
        for key in sorted(self.parent, key=self.order.__getitem__):
            out.setdefault(self.find(key), []).append(key)
        return list(out.values())


@dataclass
class Resolution:
    """The resolution expression of every tensor of one graph, from one run in several worlds.

    Attributes:
        gm: The analysed GraphModule.
        worlds: The worlds it ran in (world 0 is the reference).
        exprs: Node -> expression (tensor nodes only).
        shapes: Node -> its shape in every world.
        dims: Node -> its spatial dimensions.
        signature: Expression -> its spatial sizes in every world.
    """

    gm: fx.GraphModule
    worlds: list[World]
    exprs: dict[fx.Node, Expr] = field(default_factory=dict)
    shapes: dict[fx.Node, list[tuple[int, ...]]] = field(default_factory=dict)
    dims: dict[fx.Node, tuple[int, ...]] = field(default_factory=dict)
    signature: dict[Expr, tuple] = field(default_factory=dict)
    _by_signature: dict[tuple, Expr] = field(default_factory=dict)

    def spatial(self, node: fx.Node, world: int = 0) -> tuple[int, ...]:
        """Spatial sizes of ``node`` in one world (empty for a constant-size tensor)."""
        return tuple(self.shapes[node][world][d] for d in self.dims[node])

    def is_const(self, node: fx.Node) -> bool:
        """Whether the node's size does not follow the input."""
        return self.exprs[node][0] == "const"

    # -- building -------------------------------------------------------------
    def assign(self, node: fx.Node, values: list[Any], pool_key: Callable[[fx.Node], Hashable | None]) -> None:
        """Give ``node`` its expression from its values in every world."""
        shapes = [shape_of(v) for v in values]
        if any(s is None for s in shapes):
            return
        shapes_t: list[tuple[int, ...]] = shapes  # type: ignore[assignment]
        self.shapes[node] = shapes_t
        dims = spatial_dims(shapes_t)
        self.dims[node] = dims
        sig = tuple(tuple(s[d] for d in dims) for s in shapes_t)
        inputs = [a for a in tensor_inputs(node) if a in self.exprs]
        key = pool_key(node)
        if node.op == "placeholder" and not self.exprs:
            expr = IN
        elif key is not None and inputs:
            expr = ("pool", key, self.exprs[inputs[0]])
        elif not dims:
            expr = ("const", shapes_t[0][-2:])
        else:
            same = next((a for a in inputs if self.signature.get(self.exprs[a]) == sig), None)
            if same is not None:
                expr = self.exprs[same]
            elif sig in self._by_signature:
                expr = self._by_signature[sig]
            else:
                parent = next((self.exprs[a] for a in inputs if self.exprs[a][0] != "const"), IN)
                expr = ("op", node.name, parent)
        self.exprs[node] = expr
        if expr[0] != "const":
            self.signature.setdefault(expr, sig)
            self._by_signature.setdefault(sig, expr)


def analyse(
    gm: fx.GraphModule,
    worlds: Sequence[World],
    alpha_of: Callable[[str, DynOPoolNd], tuple[Alpha, Hashable]],
    in_chans: int,
    device: torch.device,
    on_failure: FailureHandler | None = None,
) -> Resolution:
    """Run ``gm`` in every world and give each tensor its resolution expression.

    Args:
        gm: The traced model.
        worlds: World 0 is the reference; the others move the input size and the alphas.
        alpha_of: (base alpha, group key) of a DynOPool by module name; a DynOPool's
            expression is keyed by its group key, so layers of one group fed the same
            tensor share an expression.
        in_chans: Input channels.
        device: Where ops without a meta kernel run.
        on_failure: Called when an op fails in some world; it may store a value for
            the node (``runner.envs[world][node]``) to go on, or raise.

    Returns:
        The :class:`Resolution`.

    Raises:
        NodeFailure: an op failed and no handler stored a value.
    """
    res = Resolution(gm, list(worlds))
    runner = WorldRunner(gm, worlds, alpha_of, in_chans, device)
    modules = runner.modules

    def pool_key(node: fx.Node) -> Hashable | None:
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), DynOPoolNd):
            return None
        module = modules[str(node.target)]
        assert isinstance(module, DynOPoolNd)
        return alpha_of(str(node.target), module)[1]

    with MetaParams(gm) as meta, torch.no_grad():
        runner.meta = meta
        for node in gm.graph.nodes:
            for world in range(len(worlds)):
                try:
                    runner.run_node(node, world)
                except NodeFailure as failure:
                    if on_failure is None or world == 0:
                        raise
                    on_failure(res, runner, failure)
                    if node not in runner.envs[world]:
                        raise
            if node.op != "output":
                res.assign(node, runner.values(node), pool_key)
    return res


def describe(expr: Expr, name_of: Callable[[Hashable], str] = str) -> str:
    """Readable form of an expression."""
    kind = expr[0]
    if kind == "in":
        return "input"
    if kind == "const":
        return f"fixed {tuple(expr[1])}"
    if kind == "pool":
        return f"{name_of(expr[1])}({describe(expr[2], name_of)})"
    return f"{expr[1]}({describe(expr[2], name_of)})"


def unify(a: Expr, b: Expr, groups: UnionFind) -> bool:
    """Make ``a`` and ``b`` equal for every alpha by joining pool groups; False when no tying can.

    Two DynOPools give equal sizes for every alpha exactly when their inputs do and they
    share one alpha; other ops are taken to be equal when their inputs are (the check that
    follows every tying runs the model again and catches the rest).
    """
    if a == b:
        return True
    if a[0] != b[0]:
        return False
    if a[0] == "const":
        return tuple(a[1]) == tuple(b[1])
    if a[0] == "pool":
        if not unify(a[2], b[2], groups):
            return False
        groups.union(a[1], b[1])
        return True
    if a[0] == "op":
        return unify(a[2], b[2], groups)
    return True
