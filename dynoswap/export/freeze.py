"""freeze(): replace every DynOPool (1-d, 2-d or 3-d) by the fixed standard ops it computes at its learned scale.

A DynOPool2d with ``n`` output cells per axis samples its input at exactly the grid of
``F.interpolate(x, size=2n, mode="bilinear", align_corners=False)`` and takes the max (or
mean) of each 2x2 block. Frozen, that is ``F.interpolate`` to the integer size ``(2 h_out,
2 w_out)`` followed by ``F.max_pool2d(., 2, 2)`` (``F.avg_pool2d`` for ``aggregate="mean"``);
when the output is exactly half of an even input the interpolation is the identity and only
the pool remains. Sizes are integers, never a float ``scale_factor``. DynOPool1d and DynOPool3d
freeze the same way, with ``linear`` / ``trilinear`` interpolation and a 2-per-axis pool.

For deployment, ``freeze(..., fold_bn=True)`` folds every eval-mode BatchNorm2d into the
convolution that feeds it (the conv gains the bias; no BatchNorm2d is left), and
``channels_last=True`` (2-D models) stores the 4-D weights in ``torch.channels_last`` and converts the
input to it first thing in the graph. On the CPU that layout is what makes the frozen
resample cheap: ``upsample_bilinear2d`` and ``max_pool2d`` are vectorised over channels
there, about ten times faster than on contiguous maps. Both are recorded, so a saved
frozen model loads with the same structure. Conv + activation fusion is left to the
backend: eager PyTorch on the CPU has no fused conv + ReLU kernel to call, and ONNX
Runtime fuses Conv + BatchNormalization and Conv + Relu itself (see the export tests).

Two input-size contracts:

* **fixed** (``freeze(model, input_size)``): every layer keeps the output size it has at
  ``input_size``. The graph is plain ``torch.nn.functional`` calls with integer constants,
  and the model checks its input: another spatial size raises :class:`FrozenSizeError`
  (the batch size is free). This is what deployment and export want.
* **ratio** (``freeze(model)``): every layer keeps its learned ratio ``1 / alpha`` and
  computes its integer output size from its input at run time, by the layer's own rounding
  rule (:func:`dynoswap.layers.cells`); other input sizes work as they did before freezing.
  Traced at one input size (``torch.export``, ONNX) it is the fixed graph of that size.

The frozen model records what it was frozen to in ``gm.meta["dynoswap"]["frozen"]`` (JSON-able),
and :func:`refreeze` rebuilds the same frozen graph from the converted model and that record,
which is how a saved frozen model loads.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..cost.count import CONV_TYPES
from ..errors import ExportError, FrozenSizeError, RecipeError
from ..io.recipe import RECIPE_KEY
from ..layers import DynOPoolNd, cells
from ..layers.dynopool import AGGREGATES
from ..layers.resample import interpolation_mode
from ..validate import check_alpha, check_input_extent

FROZEN_KEY = "frozen"
FROZEN_VERSION = 2
#: Versions :meth:`FrozenSpec.from_dict` reads; version 1 has no deployment options.
_READABLE_VERSIONS = (1, 2)
MODES = ("fixed", "ratio")
_PRECISIONS = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class FrozenPool:
    """What one DynOPool was frozen to (one entry per spatial axis in ``alpha`` and the sizes).

    Attributes:
        name: Module path of the replaced DynOPool.
        aggregate: ``"max"`` or ``"mean"``.
        alpha: The learned ``1/r`` per axis (``(1/r_h, 1/r_w)`` in 2-D), exactly as stored.
        precision: ``"float32"`` or ``"float64"``: the dtype the layer rounded sizes in.
        in_size: Input size (``(h, w)`` in 2-D) at the freeze input size (fixed contract only).
        out_size: Output size at the freeze input size (fixed contract only).
    """

    name: str
    aggregate: str
    alpha: tuple[float, ...]
    precision: str
    in_size: tuple[int, ...] | None = None
    out_size: tuple[int, ...] | None = None

    @property
    def ndim(self) -> int:
        """Number of spatial axes the layer resized."""
        return len(self.alpha)

    @property
    def scale(self) -> tuple[float, ...]:
        """The learned scale factors (``(r_h, r_w)`` in 2-D)."""
        return tuple(1.0 / a for a in self.alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples as lists), with the scale for readers."""
        data = asdict(self)
        for key in ("alpha", "in_size", "out_size"):
            data[key] = list(data[key]) if data[key] is not None else None
        data["scale"] = list(self.scale)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FrozenPool:
        """Read and validate one record (the inverse of :meth:`to_dict`)."""
        try:
            pool = cls(
                name=str(data["name"]),
                aggregate=str(data["aggregate"]),
                alpha=_floats(data["alpha"]),
                precision=str(data["precision"]),
                in_size=_ints(data["in_size"]) if data.get("in_size") is not None else None,
                out_size=_ints(data["out_size"]) if data.get("out_size") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RecipeError(f"frozen layer record {dict(data)!r} is malformed: {exc}") from exc
        if pool.aggregate not in AGGREGATES or pool.precision not in _PRECISIONS:
            raise RecipeError(f"frozen layer {pool.name!r}: unknown aggregate or precision in {dict(data)!r}")
        if any(size is not None and len(size) != pool.ndim for size in (pool.in_size, pool.out_size)):
            raise RecipeError(f"frozen layer {pool.name!r}: alpha and sizes have different lengths in {dict(data)!r}")
        try:
            check_alpha(pool.alpha, f"frozen layer {pool.name!r}: alpha")
            for size in (pool.in_size, pool.out_size):
                if size is not None and min(size) < 1:
                    raise ValueError(f"frozen layer {pool.name!r}: sizes must be positive, got {size}")
                if size is not None:
                    check_input_extent(size, f"frozen layer {pool.name!r}: size")
        except ValueError as exc:
            raise RecipeError(str(exc)) from exc
        return pool


#: Spatial axes a frozen record may have.
_AXIS_COUNTS = (1, 2, 3)


def _floats(value: Any) -> tuple[float, ...]:
    values = tuple(float(v) for v in value)
    if len(values) not in _AXIS_COUNTS:
        raise ValueError(f"{value!r} does not have 1, 2 or 3 values")
    return values


def _ints(value: Any) -> tuple[int, ...]:
    values = tuple(value)
    if any(isinstance(v, bool) or int(v) != v for v in values) or len(values) not in _AXIS_COUNTS:
        raise ValueError(f"{value!r} is not 1, 2 or 3 integers")
    return tuple(int(v) for v in values)


@dataclass(frozen=True)
class FrozenSpec:
    """The ``frozen`` section of a recipe: the contract, the input size and every layer."""

    mode: str
    input_size: tuple[int, ...] | None
    pools: tuple[FrozenPool, ...]
    folded: tuple[tuple[str, str], ...] = ()  #: (conv, batch norm) module pairs folded into the conv
    channels_last: bool = False  #: weights and the input in ``torch.channels_last``

    @property
    def deploy(self) -> bool:
        """Whether any deployment option (folding, channels_last) was applied."""
        return bool(self.folded) or self.channels_last

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict, stored at ``gm.meta["dynoswap"]["frozen"]`` (version 1 when no deployment option)."""
        data: dict[str, Any] = {
            "version": FROZEN_VERSION if self.deploy else 1,
            "mode": self.mode,
            "input_size": list(self.input_size) if self.input_size is not None else None,
            "pools": [p.to_dict() for p in self.pools],
        }
        if self.deploy:
            data["folded"] = [list(pair) for pair in self.folded]
            data["channels_last"] = self.channels_last
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FrozenSpec:
        """Read and validate a ``frozen`` section."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"the frozen section must be an object, got {type(data).__name__}")
        if data.get("version") not in _READABLE_VERSIONS:
            raise RecipeError(
                f"frozen section version {data.get('version')!r} is not supported ({list(_READABLE_VERSIONS)})"
            )
        mode = data.get("mode")
        if mode not in MODES:
            raise RecipeError(f"frozen mode must be one of {MODES}, got {mode!r}")
        pools = data.get("pools")
        if not isinstance(pools, list):
            raise RecipeError("the frozen section has no list of pools")
        try:
            input_size = _ints(data["input_size"]) if data.get("input_size") is not None else None
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"frozen input_size is malformed: {exc}") from exc
        folded = data.get("folded", [])
        channels_last = data.get("channels_last", False)
        if not isinstance(channels_last, bool) or not isinstance(folded, list):
            raise RecipeError("frozen folded must be a list of [conv, norm] pairs and channels_last a boolean")
        try:
            pairs = tuple((str(conv), str(norm)) for conv, norm in folded)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"frozen folded must be a list of [conv, norm] pairs, got {folded!r}") from exc
        spec = cls(mode, input_size, tuple(FrozenPool.from_dict(p) for p in pools), pairs, channels_last)
        if mode == "fixed" and (input_size is None or any(p.out_size is None or p.in_size is None for p in spec.pools)):
            raise RecipeError("a fixed-size frozen section needs input_size and every layer's in_size and out_size")
        if spec.channels_last and any(p.ndim != 2 for p in spec.pools):
            raise RecipeError("a frozen section with channels_last must only freeze 2-D layers")
        return spec


# -- what the frozen graph calls ------------------------------------------------------
def check_input_size(x: torch.Tensor, expected: tuple[int, ...]) -> torch.Tensor:
    """Return ``x`` if its spatial size is ``expected``; raise :class:`FrozenSizeError` otherwise."""
    if isinstance(x, fx.Proxy):  # symbolic tracing of a frozen model (cost analysis): sizes are not known
        return x
    got = tuple(x.shape[2:])
    if x.dim() != len(expected) + 2 or got != tuple(expected):
        raise FrozenSizeError(
            f"this frozen model takes (N, C, {', '.join(map(str, expected))}) inputs, got shape {tuple(x.shape)}: "
            "resize the input, or freeze the trained model again at this input size "
            "(or without an input size, to keep the learned ratios)"
        )
    return x


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` in ``torch.channels_last`` (a 4-D input; the first op of a channels_last frozen model)."""
    return x.contiguous(memory_format=torch.channels_last)


_POOL_FNS: dict[tuple[str, int], Any] = {
    ("max", 1): F.max_pool1d,
    ("max", 2): F.max_pool2d,
    ("max", 3): F.max_pool3d,
    ("mean", 1): F.avg_pool1d,
    ("mean", 2): F.avg_pool2d,
    ("mean", 3): F.avg_pool3d,
}


def _pool_fn(aggregate: str, ndim: int = 2) -> Any:
    return _POOL_FNS[aggregate, ndim]


def resize_pool(x: torch.Tensor, out_size: tuple[int, ...], aggregate: str) -> torch.Tensor:
    """Compute what a DynOPool with output size ``out_size`` computes: interpolate to twice it, 2-per-axis pool."""
    doubled = tuple(2 * n for n in out_size)
    if doubled != tuple(x.shape[2:]):
        x = F.interpolate(x, size=doubled, mode=interpolation_mode(len(out_size)), align_corners=False)
    return _pool_fn(aggregate, len(out_size))(x, 2, 2)


def ratio_resize_pool(x: torch.Tensor, alpha: tuple[float, ...], precision: str, aggregate: str) -> torch.Tensor:
    """Apply a DynOPool frozen at ``alpha``: the output size follows the input size by the layer's rule."""
    dtype = _PRECISIONS[precision]
    sides = x.shape[2:]
    return resize_pool(x, tuple(cells(n, a, dtype) for n, a in zip(sides, alpha, strict=True)), aggregate)


# -- freezing -------------------------------------------------------------------------
class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, DynOPoolNd) or super().is_leaf_module(m, module_qualified_name)


def _as_graph_module(model: nn.Module) -> fx.GraphModule:
    from ..graph.modal import ModalGraphModule

    if isinstance(model, ModalGraphModule):
        # A model whose forward depends on the mode ships its eval-mode graph: training-only branches
        # (auxiliary heads, stochastic depth) are not part of what a frozen model computes.
        plain = fx.GraphModule(model, model.eval_graph, class_name=type(model).__name__)
        plain.meta = dict(model.meta)
        return plain
    if isinstance(model, fx.GraphModule):
        return model
    try:
        return fx.GraphModule(model, _LeafTracer().trace(model))
    except Exception as exc:
        raise ExportError(
            f"cannot trace {type(model).__name__} to freeze it ({type(exc).__name__}: {exc}); "
            "freeze the GraphModule that dynoswap.convert returned"
        ) from exc


def _pool_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), DynOPoolNd)]


def _precision(pool: DynOPoolNd) -> str:
    return "float64" if pool.alpha.dtype == torch.float64 else "float32"


def example_input(model: nn.Module, input_size: Sequence[int], batch: int = 1, seed: int | None = None) -> torch.Tensor:
    """Return a random (batch, C, *input_size) input for ``model``: C of its first conv, its device and dtype.

    The conv looked for has as many spatial axes as ``input_size`` (``nn.Conv2d`` for (H, W)).
    """
    conv_type = CONV_TYPES.get(len(input_size), nn.Conv2d)
    first = next((m for m in model.modules() if isinstance(m, conv_type)), None)
    param = next(iter(model.parameters()), None)
    channels = first.in_channels if first is not None else 3
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    x = torch.randn(batch, channels, *(int(v) for v in input_size), generator=generator, dtype=dtype)
    return x.to(device)


def _sizes_at(gm: fx.GraphModule, nodes: list[fx.Node], input_size: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Input size (h, w) of each DynOPool call at ``input_size``, from one forward pass."""
    seen: dict[str, list[tuple[int, ...]]] = {}
    hooks = []
    for name in {n.target for n in nodes}:

        def record(module: nn.Module, args: tuple[Any, ...], name: str = str(name)) -> None:
            seen.setdefault(name, []).append(tuple(args[0].shape[2:]))

        hooks.append(gm.get_submodule(str(name)).register_forward_pre_hook(record))
    was_training = gm.training
    try:
        gm.eval()
        with torch.no_grad():
            gm(example_input(gm, input_size).zero_())
    except Exception as exc:
        raise ExportError(f"the model does not run at input size {input_size}: {type(exc).__name__}: {exc}") from exc
    finally:
        gm.train(was_training)
        for hook in hooks:
            hook.remove()
    calls = {name: iter(sizes) for name, sizes in seen.items()}
    try:
        return [next(calls[str(n.target)]) for n in nodes]
    except (KeyError, StopIteration) as exc:
        raise ExportError("a DynOPool of the graph did not run at the freeze input size") from exc


#: The (conv, batch norm) types that fold, by number of spatial axes.
_FOLDABLE: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    1: (nn.Conv1d, nn.BatchNorm1d),
    2: (nn.Conv2d, nn.BatchNorm2d),
    3: (nn.Conv3d, nn.BatchNorm3d),
}


def foldable_pairs(gm: fx.GraphModule, ndim: int = 2) -> tuple[tuple[str, str], ...]:
    """(conv, batch norm) module pairs of ``gm`` that fold exactly in eval mode.

    A pair qualifies when a Conv2d's output feeds only a BatchNorm2d with running
    statistics, and each of the two modules is called once in the graph.

    Args:
        gm: The graph.
        ndim: Spatial axes of the model: Conv1d + BatchNorm1d or Conv3d + BatchNorm3d pairs for 1 or 3.
    """
    conv_type, norm_type = _FOLDABLE[ndim]
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[str(n.target)] = calls.get(str(n.target), 0) + 1
    pairs = []
    for n in gm.graph.nodes:
        norm = modules.get(str(n.target)) if n.op == "call_module" else None
        if not isinstance(norm, norm_type) or norm.running_mean is None or norm.running_var is None:
            continue
        source = n.args[0] if n.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
            continue
        if (
            isinstance(modules.get(str(source.target)), conv_type)
            and calls[str(source.target)] == calls[str(n.target)] == 1
        ):
            pairs.append((str(source.target), str(n.target)))
    return tuple(pairs)


def describe(
    model: nn.Module, input_size: Sequence[int] | None = None, *, fold_bn: bool = False, channels_last: bool = False
) -> FrozenSpec:
    """Describe what :func:`freeze` would freeze ``model`` to, without changing it.

    Args:
        model: A converted model (GraphModule with DynOPool modules).
        input_size: (H, W) for the fixed contract ((L,) or (T, H, W) for 1-D and 3-D models);
            None for the ratio contract.
        fold_bn: List the conv + batch norm pairs to fold (:func:`foldable_pairs`).
        channels_last: Record the channels_last layout.
    """
    gm = _as_graph_module(model)
    nodes = _pool_nodes(gm)
    size = _ints(input_size) if input_size is not None else None
    in_sizes = _sizes_at(gm, nodes, size) if size is not None else [None] * len(nodes)
    pools = []
    for node, in_size in zip(nodes, in_sizes, strict=True):
        layer = gm.get_submodule(str(node.target))
        assert isinstance(layer, DynOPoolNd)
        alpha = tuple(layer.alpha.detach().double().tolist())
        precision = _precision(layer)
        out = None
        if in_size is not None:
            dtype = _PRECISIONS[precision]
            out = tuple(cells(n, a, dtype) for n, a in zip(in_size, alpha, strict=True))
            if out != layer.output_size(in_size):  # one rule: the layer's own rounding must agree
                raise ExportError(
                    f"{node.target}: frozen size {out} differs from the layer's {layer.output_size(in_size)}"
                )
        pools.append(FrozenPool(str(node.target), layer.aggregate, alpha, precision, in_size, out))
    if channels_last and any(p.ndim != 2 for p in pools):
        raise ExportError("channels_last is for 2-D models: this model has DynOPool1d or DynOPool3d layers")
    ndims = {p.ndim for p in pools}
    folded = foldable_pairs(gm, ndims.pop() if len(ndims) == 1 else 2) if fold_bn else ()
    return FrozenSpec("fixed" if size is not None else "ratio", size, tuple(pools), folded, channels_last)


def _set_module(gm: fx.GraphModule, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)


def _fold(gm: fx.GraphModule, pairs: Sequence[tuple[str, str]]) -> None:
    """Fold each (conv, batch norm) pair: the conv computes ``bn(conv(x))`` of eval mode, the norm goes."""
    nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    if not all(conv in nodes and norm in nodes and nodes[norm].args[0] is nodes[conv] for conv, norm in pairs):
        raise RecipeError(f"the frozen section folds {[list(p) for p in pairs]}, which this model does not have")
    for conv_name, norm_name in pairs:
        conv, norm = gm.get_submodule(conv_name), gm.get_submodule(norm_name)
        assert isinstance(conv, nn.modules.conv._ConvNd) and isinstance(norm, nn.modules.batchnorm._BatchNorm)
        fused = fuse_conv_bn_eval(copy.deepcopy(conv).eval(), copy.deepcopy(norm).eval())
        _set_module(gm, conv_name, fused.train(conv.training))
        nodes[norm_name].replace_all_uses_with(nodes[conv_name])
        gm.graph.erase_node(nodes[norm_name])
        gm.delete_submodule(norm_name)


def _rewrite(gm: fx.GraphModule, spec: FrozenSpec) -> fx.GraphModule:
    """Replace the DynOPool nodes of ``gm`` (a copy, modified in place) by the ops of ``spec``."""
    nodes = _pool_nodes(gm)
    names = [str(n.target) for n in nodes]
    if names != [p.name for p in spec.pools]:
        raise RecipeError(
            f"the frozen section lists DynOPools {[p.name for p in spec.pools]} but the model has {names}: "
            "it was frozen from another conversion"
        )
    graph = gm.graph
    for node, pool in zip(nodes, spec.pools, strict=True):
        x = node.args[0]
        with graph.inserting_before(node):
            if spec.mode == "fixed":
                assert pool.in_size is not None and pool.out_size is not None
                doubled = tuple(2 * n for n in pool.out_size)
                if doubled != pool.in_size:
                    mode = interpolation_mode(pool.ndim)
                    kwargs: dict[str, Any] = {"size": doubled, "mode": mode, "align_corners": False}
                    x = graph.call_function(F.interpolate, (x,), kwargs)
                    x.meta.update(node.meta)
                new = graph.call_function(_pool_fn(pool.aggregate, pool.ndim), (x, 2, 2))
            else:
                new = graph.call_function(ratio_resize_pool, (x, pool.alpha, pool.precision, pool.aggregate))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    if spec.mode == "fixed":
        assert spec.input_size is not None
        placeholder = next((n for n in graph.nodes if n.op == "placeholder"), None)
        if placeholder is not None:
            with graph.inserting_after(placeholder):
                checked = graph.call_function(check_input_size, (placeholder, spec.input_size))
            placeholder.replace_all_uses_with(checked, delete_user_cb=lambda user: user is not checked)
    _fold(gm, spec.folded)
    if spec.channels_last:
        first = next((n for n in graph.nodes if n.target is check_input_size), None)
        first = first or next(n for n in graph.nodes if n.op == "placeholder")
        with graph.inserting_after(first):
            converted = graph.call_function(to_channels_last, (first,))
        first.replace_all_uses_with(converted, delete_user_cb=lambda user: user is not converted)
        gm.to(memory_format=torch.channels_last)
    for name in dict.fromkeys(names):
        gm.delete_submodule(name)
    graph.lint()
    gm.recompile()
    leftovers = [n for n, m in gm.named_modules() if isinstance(m, DynOPoolNd)]
    leftovers += [n for n, _ in gm.named_parameters() if n.rsplit(".", 1)[-1] == "alpha"]
    if leftovers:
        raise ExportError(f"DynOPool modules or alphas outside the graph's calls remain: {leftovers}")
    recipe = dict(gm.meta.get(RECIPE_KEY) or {})
    recipe[FROZEN_KEY] = spec.to_dict()
    gm.meta[RECIPE_KEY] = recipe
    return gm


@overload
def freeze(
    model: fx.GraphModule,
    input_size: Sequence[int] | None = None,
    *,
    fold_bn: bool = False,
    channels_last: bool = False,
) -> fx.GraphModule: ...


@overload
def freeze(
    model: nn.Module, input_size: Sequence[int] | None = None, *, fold_bn: bool = False, channels_last: bool = False
) -> nn.Module: ...


def freeze(
    model: nn.Module, input_size: Sequence[int] | None = None, *, fold_bn: bool = False, channels_last: bool = False
) -> nn.Module:
    """Return a copy of ``model`` in which every DynOPool (1-d, 2-d, 3-d) is fixed standard ops.

    The copy has no ``alpha`` parameters and no DynOPool; every other parameter and
    buffer keeps its key (unless folded). In eval mode its outputs equal the converted model's.

    Args:
        model: A converted model (the GraphModule of ``dynoswap.convert`` or ``dynoswap.load``), or a whole
            model with one converted part (``convert(..., submodule=...)``): that part is frozen in place.
        input_size: (H, W) ((L,) or (T, H, W) for 1-D and 3-D models; a converted part's own input size):
            freeze the output sizes at this input size (the fixed contract; other input sizes raise
            :class:`FrozenSizeError`). None keeps the learned ratios (any input size).
        fold_bn: Fold each eval-mode BatchNorm2d into the Conv2d feeding it (:func:`foldable_pairs`; the
            1-d or 3-d pairs in a model whose DynOPools are all 1-d or 3-d):
            an inference graph with no batch norm, equal to the eval model to float rounding (about
            1e-6). Its training mode no longer normalises: freeze without folding to fine-tune.
        channels_last: Weights and the input in ``torch.channels_last`` (faster on the CPU for most
            CNNs, the frozen resample above all; ``bench deploy`` measures it). 2-D models only.

    Returns:
        The frozen GraphModule (the whole model for a converted part); ``meta["dynoswap"]["frozen"]``
        records what it was frozen to.

    Raises:
        ExportError: the model cannot be traced or does not run at ``input_size``.
    """
    from ..engine.submodule import resolve_part
    from ..io.recipe import part_of

    path = part_of(model)
    if path is not None:
        part = freeze(
            _as_graph_module(resolve_part(model, path)), input_size, fold_bn=fold_bn, channels_last=channels_last
        )
        return _with_frozen_part(model, part)
    gm = _as_graph_module(model)
    spec = describe(gm, input_size, fold_bn=fold_bn, channels_last=channels_last)
    return _rewrite(_copy(gm), spec)


def refreeze(converted: nn.Module, frozen: Mapping[str, Any]) -> nn.Module:
    """Rebuild a frozen model from its converted model and its recorded ``frozen`` section.

    This is how a saved frozen model loads: rebuild the converted model from the recipe,
    ``refreeze`` it with ``recipe["frozen"]``, then load the weights (which have no alphas).
    The converted model's alphas are not read: sizes and ratios come from the record.

    Raises:
        RecipeError: the section is malformed or lists other DynOPools than the model has.
    """
    from ..engine.submodule import resolve_part
    from ..io.recipe import part_of

    spec = FrozenSpec.from_dict(frozen)
    path = part_of(converted)
    if path is not None:
        return _with_frozen_part(converted, _rewrite(_copy(_as_graph_module(resolve_part(converted, path))), spec))
    return _rewrite(_copy(_as_graph_module(converted)), spec)


def _with_frozen_part(model: nn.Module, part: fx.GraphModule) -> nn.Module:
    """Return a copy of the whole ``model``, its converted part replaced by the frozen ``part`` and recorded."""
    from ..engine.submodule import replace_part

    whole = replace_part(model, part)
    meta: dict[str, Any] = whole.meta  # type: ignore[assignment]  # the recipe dict convert(submodule=) set
    meta[RECIPE_KEY] = {**meta[RECIPE_KEY], FROZEN_KEY: copy.deepcopy(part.meta[RECIPE_KEY][FROZEN_KEY])}
    return whole


def is_frozen(model: nn.Module) -> bool:
    """Whether ``model`` is the output of :func:`freeze` (it records a ``frozen`` section)."""
    meta = getattr(model, "meta", None) or {}
    return FROZEN_KEY in (meta.get(RECIPE_KEY) or {})


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    clone = copy.deepcopy(gm)
    clone.meta = copy.deepcopy(dict(gm.meta))
    return clone
