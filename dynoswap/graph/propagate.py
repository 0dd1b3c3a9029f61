"""Shape propagation in several worlds at once, on the meta device.

A *world* is one input size and one multiplier per tie group on the DynOPool alphas.
Running a traced model in a few worlds side by side tells, without a table of ops,
which dimensions of each tensor follow the resolution (those that differ between
worlds), which tensors share a resolution (equal sizes in every world) and which ops
need their inputs' resolutions to agree (those that fail once the worlds pull the
inputs apart).

Parameters and buffers are swapped for meta tensors, so no arithmetic runs; an op
without a meta kernel (or with data-dependent Python) runs for real on zeros, for
that node only.
"""

from __future__ import annotations

import contextlib
import operator
import random
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from ..layers import DynOPoolNd
from ..layers.sizing import output_size

#: Modules that keep their input's shape, answered without running them (their meta kernels are slow).
SHAPE_KEEPING: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.PReLU,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
)

#: Elementwise binary ops answered by broadcasting shapes (their meta kernels run slow Python refs);
#: a shortcut with the op's own semantics: a shape that does not broadcast raises, as the op would.
BROADCASTING: set[Any] = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}

Alpha = tuple[float, ...]
#: Most input elements an op without a meta kernel may run on for real (zeros) during the analysis.
REAL_LIMIT = 1 << 22
#: Input-size multipliers per axis of the moved worlds: larger, so late maps do not collapse to the minimum;
#: axis ``i`` of world ``k`` uses ``WORLD_INPUTS[k][i % 3]`` (1-D takes the first column, 3-D all three).
WORLD_INPUTS = ((2.0, 1.5, 1.75), (1.5, 2.0, 2.25), (2.5, 2.25, 1.5))
#: Alpha multipliers: each group is moved up on one axis and down on the other, then both at random.
UP, DOWN = (1.12, 1.75), (0.55, 0.9)


@dataclass(frozen=True)
class World:
    """One input size and one multiplier per tie group on its alpha.

    Attributes:
        input_size: Spatial size of the input: (L,), (H, W) or (T, H, W).
        factors: Group key -> one factor per axis multiplying the group's alpha (absent: 1).
    """

    input_size: tuple[int, ...]
    factors: dict[Any, Alpha] = field(default_factory=dict)


def make_worlds(input_size: tuple[int, ...], groups: Sequence[Hashable], seed: int = 0) -> list[World]:
    """World 0 at the reference, then worlds moving each group's alpha independently per axis.

    Factors are spread evenly over their interval and shuffled, so no two groups share one; in the
    first two worlds neighbouring axes move in opposite directions, in the third each at random.
    """
    rng = random.Random(seed)
    ndim = len(input_size)
    worlds = [World(tuple(input_size))]
    n = max(len(groups), 1)

    def spread(lo: float, hi: float) -> list[float]:
        values = [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]
        rng.shuffle(values)
        return values

    patterns = [(UP, DOWN), (DOWN, UP), None]
    for multipliers, pattern in zip(WORLD_INPUTS, patterns, strict=True):
        if pattern is None:
            per_axis = [[rng.choice((rng.uniform(*UP), rng.uniform(*DOWN))) for _ in groups] for _ in range(ndim)]
        else:
            per_axis = [spread(*pattern[axis % 2]) for axis in range(ndim)]
        factors = {g: tuple(per_axis[axis][i] for axis in range(ndim)) for i, g in enumerate(groups)}
        size = tuple(round(input_size[axis] * multipliers[axis % 3]) for axis in range(ndim))
        worlds.append(World(size, factors))
    return worlds


class OpError(Exception):
    """An op of the model refused the values it was given (its own answer, e.g. a shape mismatch).

    :meth:`WorldRunner.compute` raises it for what the model's ops raise, so that an error of the
    runner itself (a dynoswap bug) is never mistaken for the model's answer and propagates as it is.

    Attributes:
        cause: What the op raised.
    """

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _op(fn: Callable[[tuple, dict], Any], args: tuple, kwargs: dict) -> Any:
    """Call one of the model's ops; what it raises becomes an :class:`OpError`."""
    try:
        return fn(args, kwargs)
    except Exception as err:
        raise OpError(err) from err


class NodeFailure(Exception):
    """An op failed in one world; carries the node, the world and the cause."""

    def __init__(self, node: fx.Node, world: int, cause: BaseException) -> None:
        super().__init__(f"{node.name}: {cause}")
        self.node = node
        self.world = world
        self.cause = cause


class MetaParams:
    """Swap every parameter and buffer of ``root`` for a meta tensor; keep the real ones for fallbacks."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.saved: dict[int, list[tuple[dict, str, torch.Tensor]]] = {}

    def __enter__(self) -> MetaParams:
        for module in self.root.modules():
            if isinstance(module, DynOPoolNd):
                continue  # sizes are computed from the alpha values
            entries = []
            stores: tuple[dict[str, Any], ...] = (module._parameters, module._buffers)
            for store in stores:
                for key, t in store.items():
                    if t is None or t.is_meta:
                        continue
                    entries.append((store, key, t))
                    meta = t.detach().to("meta")
                    store[key] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
            if entries:
                self.saved[id(module)] = entries
        return self

    def __exit__(self, *exc: object) -> None:
        for entries in self.saved.values():
            for store, key, t in entries:
                store[key] = t
        self.saved.clear()

    @contextlib.contextmanager
    def real(self, module: nn.Module) -> Iterator[None]:
        """Give ``module`` (and its children) their real tensors for the duration."""
        swapped = []
        for sub in module.modules():
            for store, key, t in self.saved.get(id(sub), []):
                swapped.append((store, key, store[key]))
                store[key] = t
        try:
            yield
        finally:
            for store, key, meta in swapped:
                store[key] = meta


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; restore each module's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _materialise(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and value.is_meta:
        return torch.zeros(value.shape, dtype=value.dtype, device=device)
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_materialise(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _materialise(v, device) for k, v in value.items()}
    return value


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _mutable(value: Any) -> Any:
    """Fx's immutable lists and dicts as plain ones, as the model's own code passes them (callees may mutate)."""
    if isinstance(value, immutable_list):
        return [_mutable(v) for v in value]
    if isinstance(value, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and not value.is_meta:
        return value.detach().to("meta")
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_to_meta(v) for v in value)
    return value


def pool_size(n_in: tuple[int, ...], alpha: Alpha) -> tuple[int, ...]:
    """DynOPool output size for ``alpha`` (the layer's own rule, in float32 like its forward), per axis."""
    return tuple(output_size(tuple(n_in), torch.tensor(alpha, dtype=torch.float32)))


class WorldRunner:
    """Run a GraphModule node by node in several worlds.

    Args:
        gm: The traced model.
        worlds: The worlds; world 0 is the reference.
        alpha_of: Base alpha of a DynOPool (before the world's factor) and its group key.
        in_chans: Input channels.
        device: Where fallbacks compute (the model's device, or CPU for a meta model).
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        worlds: Sequence[World],
        alpha_of: Callable[[str, DynOPoolNd], tuple[Alpha, Any]],
        in_chans: int,
        device: torch.device,
        batch: int = 2,
    ) -> None:
        self.gm = gm
        self.worlds = list(worlds)
        self.alpha_of = alpha_of
        self.in_chans = in_chans
        self.device = device if device.type != "meta" else torch.device("cpu")
        self.batch = batch
        self.modules = dict(gm.named_modules())
        self.envs: list[dict[fx.Node, Any]] = [{} for _ in self.worlds]
        self.first_input: fx.Node | None = next((n for n in gm.graph.nodes if n.op == "placeholder"), None)
        param = next((p for p in gm.parameters() if p.is_floating_point()), None)
        self.dtype = param.dtype if param is not None else torch.float32
        self.meta: MetaParams | None = None
        self.real_nodes: set[fx.Node] = set()

    def values(self, node: fx.Node) -> list[Any]:
        """Return the node's value in every world."""
        return [env[node] for env in self.envs]

    def args_in(self, node: fx.Node, world: int) -> tuple[tuple, dict]:
        """Return the node's args and kwargs in one world."""
        env = self.envs[world]
        args = _mutable(fx.node.map_arg(node.args, lambda a: env[a]))
        kwargs = _mutable(fx.node.map_arg(node.kwargs, lambda a: env[a]))
        return args, kwargs

    def input_value(self, world: int) -> torch.Tensor:
        """Return the meta input of one world."""
        size = self.worlds[world].input_size
        return torch.empty(self.batch, self.in_chans, *size, device="meta", dtype=self.dtype)

    def compute(self, node: fx.Node, world: int, args: tuple, kwargs: dict) -> Any:
        """Evaluate one node in one world from given args (meta first, then for real)."""
        if node.op == "placeholder":
            if node is self.first_input:
                return self.input_value(world)
            if node.args:
                return node.args[0]  # a default value
            raise OpError(ValueError(f"input '{node.name}' has no default: dynoswap converts models with one input"))
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return _to_meta(obj)
        if node.op == "output":
            return args[0]
        if node.op == "call_module":
            module = self.modules[str(node.target)]
            x = args[0] if args else None
            if isinstance(module, DynOPoolNd) and isinstance(x, torch.Tensor):
                alpha, key = self.alpha_of(str(node.target), module)
                nd = module.ndim
                factors = self.worlds[world].factors.get(key, (1.0,) * nd)
                moved = tuple(a * f for a, f in zip(alpha, factors, strict=True))
                size = pool_size(tuple(int(v) for v in x.shape[-nd:]), moved)
                return x.new_empty((*x.shape[:-nd], *size))
            if isinstance(module, SHAPE_KEEPING) and isinstance(x, torch.Tensor) and len(args) == 1:
                return x.new_empty(x.shape)

            def call(a: tuple, k: dict) -> Any:
                assert self.meta is not None
                if node in self.real_nodes:
                    with self.meta.real(module):
                        return module(*a, **k)
                return module(*a, **k)

            return self._meta_first(node, world, call, args, kwargs)
        fn: Callable[..., Any]
        if node.op == "call_method":
            fn = lambda a, k: getattr(a[0], str(node.target))(*a[1:], **k)  # noqa: E731
        else:
            fn = lambda a, k: node.target(*a, **k)  # type: ignore[operator]  # noqa: E731
        if node.target is operator.getitem or node.op == "call_method" and node.target in ("size", "dim"):
            return _op(fn, args, kwargs)
        if node.op == "call_function" and node.target in BROADCASTING and len(args) == 2 and not kwargs:
            a, b = args
            if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_meta and b.is_meta:
                if a.dtype == b.dtype:
                    return _op(lambda x, _: x[0].new_empty(torch.broadcast_shapes(x[0].shape, x[1].shape)), args, {})
        return self._meta_first(node, world, fn, args, kwargs)

    def _meta_first(
        self, node: fx.Node, world: int, fn: Callable[[tuple, dict], Any], args: tuple, kwargs: dict
    ) -> Any:
        """Run on meta; an op that fails there in the reference world (no meta kernel) runs for real on zeros.

        In the other worlds a failure on meta is the op's answer (a shape mismatch), not a missing kernel.
        What the op raises comes out as an :class:`OpError`.
        """
        if node not in self.real_nodes:
            try:
                return _op(fn, args, kwargs)
            except OpError:
                if world != 0:
                    raise
                self.real_nodes.add(node)
        size = sum(t.numel() for t in _tensors((args, kwargs)))
        if size > REAL_LIMIT:
            too_large = f"'{node.name}' has no meta kernel and its inputs ({size} elements) are too large"
            raise OpError(RuntimeError(too_large))
        with torch.no_grad():
            return _to_meta(_op(fn, _materialise(args, self.device), _materialise(kwargs, self.device)))

    def run_node(self, node: fx.Node, world: int) -> Any:
        """Evaluate and store one node in one world; raise :class:`NodeFailure` when the op fails.

        An error of the runner itself (not of the model's op) propagates unchanged: it is a dynoswap bug.
        """
        args, kwargs = self.args_in(node, world)
        try:
            value = self.compute(node, world, args, kwargs)
        except OpError as err:
            raise NodeFailure(node, world, err.cause) from err.cause
        self.envs[world][node] = value
        return value


def spatial_dims(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Dimensions that differ between worlds: those that follow the resolution."""
    first = shapes[0]
    if any(len(s) != len(first) for s in shapes):
        return ()
    return tuple(d for d in range(len(first)) if any(s[d] != first[d] for s in shapes[1:]))


def shape_of(value: Any) -> tuple[int, ...] | None:
    """Shape of a tensor value, None for anything else."""
    return tuple(int(v) for v in value.shape) if isinstance(value, torch.Tensor) else None
