"""Tie DynOPool scales, discovered by moving every scale on its own.

The converted graph runs on the meta device in several worlds (see
:mod:`dynoswap.graph`): the input size changes and every tie group's alpha is
multiplied by its own factors, different per axis, up in one world and down in
another. An op that then fails names the groups that meet there: their resolution
expressions are unified (two DynOPools fed equal resolutions must share one alpha)
and the run goes on with the op's inputs brought to one size, as the tied model would
have them. Passes repeat until one runs clean, so the last pass is the check that every
reachable combination of scales works. No op list: a ``torch.stack``, an ``einsum``
or a user's own op ties what it needs because it fails when its inputs disagree, and
broadcasting against a ``[N, C, 1, 1]`` gate ties nothing because it does not fail.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..errors import ConversionError
from ..graph import (
    NodeFailure,
    OpError,
    Resolution,
    UnionFind,
    WorldRunner,
    analyse,
    describe,
    make_worlds,
    node_label,
    unify,
)
from ..graph.resolution import tensor_inputs
from .find import per_axis
from .trace import readable_cause

#: Refusal categories (ConversionError.category) of models whose sizes cannot move.
FIXED_POSITION = "fixed position embedding"
FIXED_WINDOW = "fixed window partition"
FIXED_HEAD = "fixed-size head"
FIXED_INPUT = "fixed input size"
UNTIEABLE = "untieable merge"
BREAKS = "breaks when scales move"
OTHER_DIM = "other dimension"
ALREADY = "already converted"

#: Average pools and the adaptive pool that computes what they do when their kernel is their whole input.
GLOBAL_AVG: dict[type[nn.Module], type[nn.Module]] = {
    nn.AvgPool1d: nn.AdaptiveAvgPool1d,
    nn.AvgPool2d: nn.AdaptiveAvgPool2d,
    nn.AvgPool3d: nn.AdaptiveAvgPool3d,
}
MAX_PASSES = 64
RESHAPES = {"view", "reshape", "unflatten", "flatten", "unfold"}
#: Ops that repeat a tensor a whole number of times (a fixed-size one can only match multiples of its size).
REPEATS = {"tile", "repeat", "repeat_interleave"}


class TieError(ConversionError):
    """Tensors that must keep equal resolutions, but no tying of scales can guarantee it.

    Attributes:
        category: One of the refusal categories (``fixed position embedding``, ``fixed window
            partition``, ``fixed-size head``, ``fixed input size``, ``untieable merge``, ``breaks when
            scales move``, ``other dimension``, ``already converted``).
        node: The node where the model breaks.
    """

    def __init__(self, message: str, category: str = UNTIEABLE, node: str = "") -> None:
        super().__init__(message)
        self.category = category
        self.node = node


class _Restart(Exception):
    """The graph was rewritten (an upsampling now follows its partner, a head was adapted): run again."""


def _source_map(res: Resolution, node: fx.Node, ndim: int) -> tuple[fx.Node, fx.Node] | None:
    """Find the last (N, C, *spatial) map on the single-input chain that ends in ``node``, and the chain's next node."""
    child, current = node, node
    spatial = tuple(range(2, ndim + 2))
    for _ in range(16):
        if current is not node and len(res.shapes[current][0]) == ndim + 2 and res.dims[current] == spatial:
            return current, child
        inputs = [a for a in tensor_inputs(current) if a in res.shapes and not res.is_const(a)]
        if len(inputs) != 1:
            return None
        child, current = current, inputs[0]
    return None


def _is_linear(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), nn.Linear)
    return node.op == "call_function" and node.target in (torch.nn.functional.linear, torch.matmul, torch.mm)


class TieFinder:
    """Discover the tie groups of a converted graph.

    Args:
        gm: The converted graph (every DynOPool a call_module node, untied).
        names: DynOPool module names in execution order (the sites).
        base_alpha: Initial alpha of each DynOPool.
        input_size: The conversion's input size ((L,), (H, W) or (T, H, W)).
        in_chans: Input channels.
        device: Where ops without a meta kernel run.
        upsample_of: Interpolation options of a fixed-factor upsampling node, else None.
        resize: Rewrite an upsampling to take a partner's size (returns the new node).
        adapt_head: Called with (flatten source node, its original spatial size) to insert an adaptive
            pool; None refuses fixed-size heads.
        uf: Tie groups over DynOPool names to extend (shared by the graphs of a two-mode model).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        names: Sequence[str],
        base_alpha: dict[str, tuple[float, ...]],
        input_size: tuple[int, ...],
        in_chans: int,
        device: torch.device,
        upsample_of: Callable[[fx.Node], dict[str, Any] | None],
        resize: Callable[[fx.Node, fx.Node, dict[str, Any]], Any],
        adapt_head: Callable[[fx.Node, fx.Node, tuple[int, ...]], None] | None = None,
        uf: UnionFind | None = None,
    ) -> None:
        self.gm = gm
        self.names = list(names)
        self.base_alpha = base_alpha
        self.input_size = input_size
        self.in_chans = in_chans
        self.device = device
        self.upsample_of = upsample_of
        self.resize = resize
        self.adapt_head = adapt_head
        self.uf = uf if uf is not None else UnionFind(self.names)
        for name in self.names:
            self.uf.find(name)
        self.resized: list[str] = []
        self.adapted: list[str] = []
        self.globalised: list[str] = []
        self.limits: dict[str, str] = {}
        self.passes = 0
        self._unions = 0
        self.total_unions = 0

    # -- the run ---------------------------------------------------------------
    def alpha_of(self, name: str, module: nn.Module) -> tuple[tuple[float, ...], Hashable]:
        """Return the base alpha and current group of a DynOPool."""
        return self.base_alpha[name], self.uf.find(name)

    def leaders(self) -> list[Hashable]:
        """One key per current group."""
        return [g[0] for g in self.uf.groups()]

    @property
    def unions(self) -> int:
        """Groups joined in the last pass."""
        return self._unions

    def run(self, seed: int = 0) -> Resolution:
        """Unify until a pass in which every group moves on its own runs clean; return that pass."""
        for attempt in range(MAX_PASSES):
            self.passes += 1
            self._unions = 0
            worlds = make_worlds(self.input_size, self.leaders(), seed + attempt)
            try:
                res = analyse(self.gm, worlds, self.alpha_of, self.in_chans, self.device, self._on_failure)
            except _Restart:
                continue
            if self._unions == 0:
                return res
        raise ConversionError(f"tying did not settle after {MAX_PASSES} passes")

    def groups(self) -> list[list[str]]:
        """DynOPool names per group, in execution order."""
        return [[str(name) for name in g] for g in self.uf.groups()]

    def check(self, alphas: dict[str, tuple[float, ...]], seed: int = 1) -> Resolution:
        """Run every world at the given alphas without tying anything; fail with the node named."""
        saved = self.base_alpha
        self.base_alpha = alphas
        try:
            worlds = make_worlds(self.input_size, self.leaders(), seed)
            return analyse(self.gm, worlds, self.alpha_of, self.in_chans, self.device, self._refuse)
        finally:
            self.base_alpha = saved

    # -- failures ----------------------------------------------------------------
    def _name(self, key: Hashable) -> str:
        return str(key)

    def _refuse(self, res: Resolution, runner: WorldRunner, failure: NodeFailure) -> None:
        live = [a for a in tensor_inputs(failure.node) if a in res.exprs and not res.is_const(a)]
        if len(live) == 1 and self._minimum_size(res, runner, failure, live[0]):
            return
        raise self._error(res, failure)

    def _on_failure(self, res: Resolution, runner: WorldRunner, failure: NodeFailure) -> None:
        node, world = failure.node, failure.world
        inputs = [a for a in tensor_inputs(node) if a in res.exprs]
        live = [a for a in inputs if not res.is_const(a)]
        if len(live) == 1 and self._globalise(res, node, live[0]):
            raise _Restart
        if len(live) < 2:
            self._fixed_size(res, node, live)
            if len(live) == 1 and self._minimum_size(res, runner, failure, live[0]):
                return
            raise self._error(res, failure)
        first = live[0]
        for other in live[1:]:
            before = self.uf.groups()
            if not unify(res.exprs[first], res.exprs[other], self.uf):
                self._try_resize(res, node, first, other)
                raise self._untieable(res, node, first, other)
            if self.uf.groups() != before:
                self._unions += 1
                self.total_unions += 1
        if self._unions == 0:
            self._fixed_size(res, node, live)  # a fixed-shape operand among them (a relative position bias)
            raise self._error(res, failure)  # equal resolutions already, and still failing: not a tying matter
        value = self._patched(res, runner, node, world, first, live[1:])
        if value is None:
            raise _Restart  # the groups are joined: the next pass runs the tied model
        runner.envs[world][node] = value

    def _globalise(self, res: Resolution, node: fx.Node, x: fx.Node) -> bool:
        """Make adaptive an average pool whose kernel covered its whole input at conversion (a global pool).

        The pool is the failing op (S3D's 2x7x7 on a map that shrank) or on the single-input chain into
        it (a flatten into a Linear behind it). At the conversion size it averaged the whole map into one
        cell per axis; ``AdaptiveAvgPoolNd(1)`` computes exactly that there and keeps doing it when the
        map shrinks or grows with the scales.
        """
        for _ in range(4):
            m: Any = self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None
            if type(m) in GLOBAL_AVG and not getattr(m, "divisor_override", None):
                reference = tuple(res.shapes[x][0][2:])
                if per_axis(m.kernel_size, len(reference)) != reference or any(per_axis(m.padding, len(reference))):
                    return False
                self.gm.add_submodule(str(node.target), GLOBAL_AVG[type(m)](1))
                self.globalised.append(node_label(node))
                return True
            inputs = [a for a in tensor_inputs(x) if a in res.shapes and not res.is_const(a)]
            if len(inputs) != 1:
                return False
            node, x = x, inputs[0]
        return False

    def _minimum_size(self, res: Resolution, runner: WorldRunner, failure: NodeFailure, x: fx.Node) -> bool:
        """Let an op that needs its input as large as at conversion (a valid 5x5 conv on a 5x5 map) go on.

        Not a tying matter: the limit is recorded (``limits``) and the run goes on as if the input had its
        reference size. Returns whether that was the case.
        """
        node, world = failure.node, failure.world
        s0, sk = res.shapes[x][0], res.shapes[x][world]
        dims = res.dims[x]
        if not any(sk[d] < s0[d] for d in dims):
            return False
        grown = [max(sk[d], s0[d]) if d in dims else sk[d] for d in range(len(sk))]
        env = runner.envs[world]
        override = {x: env[x].new_empty(grown)}
        args = fx.node.map_arg(node.args, lambda a: override.get(a, env[a]))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: override.get(a, env[a]))
        try:
            value = runner.compute(node, world, args, kwargs)  # type: ignore[arg-type,unused-ignore]
        except OpError:  # the op's answer; an error of dynoswap's own code propagates
            return False
        size = "x".join(str(s0[d]) for d in dims)
        self.limits.setdefault(
            node_label(node), f"needs an input of at least {size} (its size at conversion): keep the scales before it"
        )
        env[node] = value
        return True

    def _patched(
        self, res: Resolution, runner: WorldRunner, node: fx.Node, world: int, ref: fx.Node, others: list[fx.Node]
    ) -> Any:
        """Run ``node`` with ``others`` brought to ``ref``'s resolution where they agree at the reference."""
        env = runner.envs[world]
        override = {}
        a0, ak = res.shapes[ref][0], res.shapes[ref][world]
        for b in others:
            b0, bk = res.shapes[b][0], res.shapes[b][world]
            new = list(bk)
            if len(res.dims[b]) == len(res.dims[ref]):  # spatial dims, wherever the layout put them
                for db, da in zip(res.dims[b], res.dims[ref], strict=True):
                    new[db] = ak[da]
            elif len(b0) == len(a0):
                new = [ak[d] if b0[d] == a0[d] and bk[d] != ak[d] else bk[d] for d in range(len(bk))]
            override[b] = env[b].new_empty(new)
        args = fx.node.map_arg(node.args, lambda a: override.get(a, env[a]))
        kwargs = fx.node.map_arg(node.kwargs, lambda a: override.get(a, env[a]))
        try:
            return runner.compute(node, world, args, kwargs)  # type: ignore[arg-type,unused-ignore]
        except OpError:  # the op's answer; an error of dynoswap's own code propagates
            return None

    def _try_resize(self, res: Resolution, node: fx.Node, first: fx.Node, other: fx.Node) -> None:
        """Make a fixed-factor upsampling that meets a partner take the partner's size, then run again."""
        nodes = {n.name: n for n in self.gm.graph.nodes}
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        for up_side, partner_side in ((other, first), (first, other)):
            expr = res.exprs[up_side]
            if expr[0] != "op" or expr[1] not in nodes:
                continue
            upsample = nodes[expr[1]]
            options = self.upsample_of(upsample)
            if options is None:
                continue
            target = res.exprs[partner_side]
            partner = next((n for n in order if res.exprs.get(n) == target and order[n] < order[upsample]), None)
            if partner is None or res.spatial(partner) != res.spatial(upsample):
                continue
            self.resized.append(node_label(upsample))
            self.resize(upsample, partner, options)
            raise _Restart

    def _fixed_size(self, res: Resolution, node: fx.Node, live: list[fx.Node]) -> None:
        """Refuse (or adapt) a flatten into a Linear and a fixed position embedding."""
        modules = dict(self.gm.named_modules())
        if _is_linear(node, modules) and live:
            chain = _source_map(res, node, len(self.input_size))
            if chain is not None:
                source, child = chain
                size = tuple(int(v) for v in res.shapes[source][0][2:])
                shown = "×".join(map(str, size))
                if self.adapt_head is not None:
                    self.adapted.append(node_label(node))
                    self.adapt_head(source, child, size)
                    raise _Restart
                layer = modules.get(str(node.target))
                what = (
                    f"Linear({layer.in_features} → {layer.out_features})"
                    if isinstance(layer, nn.Linear)
                    else "a matmul"
                )
                raise TieError(
                    f"'{node_label(node)}' flattens a {shown} map ('{node_label(source)}') into {what}: its input size "
                    "is fixed once scales move; convert with head='adapt' to pool the map to "
                    f"{shown} before the flatten",
                    FIXED_HEAD,
                    node_label(node),
                )
        fixed = [a for a in tensor_inputs(node) if a in res.exprs and res.is_const(a) and len(res.shapes[a][0]) >= 3]
        if live and fixed and any(max(res.shapes[a][0][1:]) > 1 for a in fixed):
            const = next(a for a in fixed if max(res.shapes[a][0][1:]) > 1)
            raise TieError(
                f"'{node_label(node)}' combines '{node_label(live[0])}' (resolution "
                f"{describe(res.exprs[live[0]], self._name)}) with '{node_label(const)}' of fixed shape "
                f"{tuple(res.shapes[const][0])} (a fixed position embedding): no tying of DynOPool scales keeps "
                "them equal once alpha moves",
                FIXED_POSITION,
                node_label(node),
            )

    def _untieable(self, res: Resolution, node: fx.Node, first: fx.Node, other: fx.Node) -> TieError:
        a, b = res.exprs[first], res.exprs[other]
        category = FIXED_POSITION if "const" in (a[0], b[0]) else UNTIEABLE
        repeated = next((r for r in (repeated_constant(res, n) for n in (first, other)) if r is not None), "")
        if repeated:
            category = FIXED_POSITION
        return TieError(
            f"'{node_label(node)}' combines '{node_label(first)}' (resolution {describe(a, self._name)}) with "
            f"'{node_label(other)}' (resolution {describe(b, self._name)}){repeated}: no tying of DynOPool scales "
            "keeps them equal once alpha moves",
            category,
            node_label(node),
        )

    def _error(self, res: Resolution, failure: NodeFailure) -> TieError:
        node = failure.node
        if node.op == "call_function" and node.target is torch._assert:
            # The assertion's own text shows torch.fx internals (Proxy(getitem_2)); say what it means instead.
            return TieError(
                f"not convertible: the model asserts a fixed input size at '{node_label(node)}' (a check of its "
                "input's size that fails once the size changes, as in ViT's and Swin's patch embeddings); dynoswap "
                "converts models whose maps may change size: it runs the model at several sizes to follow each "
                "map's resolution",
                FIXED_INPUT,
                node_label(node),
            )
        cause = readable_cause(failure.cause)
        is_reshape = (
            node.op == "call_method"
            and node.target in RESHAPES
            or (node.op == "call_function" and getattr(node.target, "__name__", "") in RESHAPES)
        )
        category = FIXED_WINDOW if is_reshape else BREAKS
        why = " (a reshape to a fixed size, e.g. a window partition)" if is_reshape else ""
        return TieError(
            f"not convertible: the converted model fails once DynOPool scales move, at '{node_label(node)}'{why}: "
            f"{cause}",
            category,
            node_label(node),
        )


def repeated_constant(res: Resolution, node: fx.Node) -> str | None:
    """Say how a fixed-size tensor is repeated to a map's size at ``node`` (None when it is not).

    A repeat (``tile``, ``repeat``) whose tensor inputs are all of fixed size, but whose output follows
    the input (counts computed from a map's size, as SAM2 Hiera's window position embedding), can
    only match maps whose size is a multiple of the fixed one: a fixed position embedding.
    """
    op = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    inputs = [a for a in tensor_inputs(node) if a in res.exprs]
    if op not in REPEATS or res.is_const(node) or not inputs or not all(res.is_const(a) for a in inputs):
        return None
    shapes = ", ".join(f"'{node_label(a)}' of fixed shape {tuple(res.shapes[a][0])}" for a in inputs)
    return f" ('{node_label(node)}' repeats {shapes} to a map's size: a fixed position embedding)"
