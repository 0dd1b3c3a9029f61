"""What downsamples: a registry of resizer kinds, keyed by module type or function.

A handler looks at one node (and its module) and returns a :class:`Resizer`, a
:class:`Skip` (a resizing op the engine leaves alone, with the reason) or ``None``
(not a resizer). New kinds plug in with :func:`register_module` / :func:`register_function`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..graph import node_label
from ..layers import DynOPoolNd


@dataclass
class Resizer:
    """A downsampling op the engine rewrites.

    Attributes:
        node: The fx node.
        kind: ``"pool"``, ``"conv"`` or ``"patchify"`` (a conv whose kernel equals its stride).
        op: What it was (module class or function name).
        stride: One per spatial axis, e.g. (s_h, s_w); its length is the op's dimension.
        kernel: One per spatial axis.
        aggregate: DynOPool aggregate that matches the op (``"max"`` or ``"mean"``).
        padding: One per spatial axis, or a padding string (``"same"``).
        ceil_mode: A pool that rounds its output size up.
    """

    node: fx.Node
    kind: str
    op: str
    stride: tuple[int, ...]
    kernel: tuple[int, ...]
    aggregate: str = "max"
    padding: tuple[int, ...] | str = (0, 0)
    ceil_mode: bool = False

    @property
    def ndim(self) -> int:
        """Spatial axes the op resizes (1, 2 or 3)."""
        return len(self.stride)

    @property
    def name(self) -> str:
        """Qualified module name, or the node name for a function call."""
        return node_label(self.node)


@dataclass
class Skip:
    """A resizing op left unchanged, and why."""

    node: fx.Node
    op: str
    reason: str

    @property
    def name(self) -> str:
        """Qualified module name, or the node name for a function call."""
        return node_label(self.node)


Found = Resizer | Skip | None
ModuleHandler = Callable[[fx.Node, nn.Module], Found]
FunctionHandler = Callable[[fx.Node], Found]

MODULE_RESIZERS: dict[type, ModuleHandler] = {}
FUNCTION_RESIZERS: dict[Any, FunctionHandler] = {}


def register_module(cls: type) -> Callable[[ModuleHandler], ModuleHandler]:
    """Register a handler for a module type (and its subclasses)."""

    def deco(fn: ModuleHandler) -> ModuleHandler:
        MODULE_RESIZERS[cls] = fn
        return fn

    return deco


def register_function(*targets: Any) -> Callable[[FunctionHandler], FunctionHandler]:
    """Register a handler for call_function targets."""

    def deco(fn: FunctionHandler) -> FunctionHandler:
        for target in targets:
            FUNCTION_RESIZERS[target] = fn
        return fn

    return deco


def per_axis(value: Any, ndim: int) -> tuple[int, ...]:
    """``value`` (a number, or one value per axis, or one value for all) as ``ndim`` ints."""
    if isinstance(value, int):
        return (value,) * ndim
    values = tuple(int(v) for v in value)
    return values * ndim if len(values) == 1 else values


def _pool_found(
    node: fx.Node,
    op: str,
    ndim: int,
    kernel: Any,
    stride: Any,
    aggregate: str,
    padding: Any = 0,
    ceil_mode: Any = False,
) -> Found:
    if any(isinstance(v, fx.Node) for v in (kernel, stride, padding, ceil_mode)) or kernel is None:
        return Skip(node, op, "kernel or stride is computed at run time")
    stride = kernel if stride is None or stride == [] or stride == () else stride
    s, k = per_axis(stride, ndim), per_axis(kernel, ndim)
    if all(v == 1 for v in s):
        return None
    return Resizer(node, "pool", op, s, k, aggregate, per_axis(padding, ndim), bool(ceil_mode))


#: Spatial axes of each pool and conv module type the engine rewrites.
MODULE_NDIM: dict[type, int] = {
    **dict.fromkeys((nn.MaxPool1d, nn.AvgPool1d, nn.Conv1d), 1),
    **dict.fromkeys((nn.MaxPool2d, nn.AvgPool2d, nn.Conv2d), 2),
    **dict.fromkeys((nn.MaxPool3d, nn.AvgPool3d, nn.Conv3d), 3),
}


def module_ndim(m: nn.Module) -> int | None:
    """Spatial axes of a pool or conv the engine rewrites (its class or a base in ``MODULE_NDIM``), else None."""
    return next((MODULE_NDIM[cls] for cls in type(m).__mro__ if cls in MODULE_NDIM), None)


def _module_ndim(m: nn.Module) -> int:
    ndim = module_ndim(m)
    assert ndim is not None, type(m)  # handlers are registered for these types only
    return ndim


def _max_pool_module(node: fx.Node, m: nn.Module) -> Found:
    return _pool_found(node, type(m).__name__, _module_ndim(m), m.kernel_size, m.stride, "max", m.padding, m.ceil_mode)


def _avg_pool_module(node: fx.Node, m: nn.Module) -> Found:
    ndim = _module_ndim(m)
    return _pool_found(node, type(m).__name__, ndim, m.kernel_size, m.stride, "mean", m.padding, m.ceil_mode)


def _adaptive(node: fx.Node, m: nn.Module) -> Found:
    return Skip(node, type(m).__name__, "adaptive/global pool: fixed output size, kept")


def _conv_module(node: fx.Node, m: nn.Module) -> Found:
    ndim = _module_ndim(m)
    s, k = per_axis(m.stride, ndim), per_axis(m.kernel_size, ndim)
    if all(v == 1 for v in s):
        return None
    padding = m.padding if isinstance(m.padding, str) else per_axis(m.padding, ndim)
    patchify = k == s and (padding == "valid" or padding == (0,) * ndim)
    return Resizer(node, "patchify" if patchify else "conv", type(m).__name__, s, k, "max", padding)


_cls: type
for _cls in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
    register_module(_cls)(_max_pool_module)
for _cls in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
    register_module(_cls)(_avg_pool_module)
for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_module(_cls)(_conv_module)
#: Adaptive (global) pools of every dimension: fixed output sizes, kept.
ADAPTIVE_POOLS: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
for _cls in ADAPTIVE_POOLS:
    register_module(_cls)(_adaptive)


def _arg(node: fx.Node, index: int, key: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


def _pool_fn(ndim: int, name: str, aggregate: str, ceil_index: int) -> FunctionHandler:
    """Return the handler of a functional pool; ``ceil_mode`` is positional argument ``ceil_index``."""

    def handler(node: fx.Node) -> Found:
        return _pool_found(
            node,
            name,
            ndim,
            _arg(node, 1, "kernel_size"),
            _arg(node, 2, "stride"),
            aggregate,
            _arg(node, 3, "padding", 0),
            _arg(node, ceil_index, "ceil_mode", False),
        )

    return handler


def _conv_fn(ndim: int, name: str) -> FunctionHandler:
    def handler(node: fx.Node) -> Found:
        stride = _arg(node, 3, "stride", 1)
        if isinstance(stride, fx.Node) or any(v != 1 for v in per_axis(stride, ndim)):
            return Skip(node, name, f"functional strided {name}: its weight is not a module the engine can rewrite")
        return None

    return handler


# max_poolNd(input, kernel, stride, padding, dilation, ceil_mode); avg_poolNd(input, kernel, stride, padding, ceil_mode)
register_function(F.max_pool1d, torch.max_pool1d)(_pool_fn(1, "max_pool1d", "max", 5))
register_function(F.max_pool2d, torch.max_pool2d)(_pool_fn(2, "max_pool2d", "max", 5))
register_function(F.max_pool3d, torch.max_pool3d)(_pool_fn(3, "max_pool3d", "max", 5))
register_function(F.avg_pool1d, torch.avg_pool1d)(_pool_fn(1, "avg_pool1d", "mean", 4))
register_function(F.avg_pool2d, torch._C._nn.avg_pool2d)(_pool_fn(2, "avg_pool2d", "mean", 4))
register_function(F.avg_pool3d, torch._C._nn.avg_pool3d)(_pool_fn(3, "avg_pool3d", "mean", 4))
register_function(F.conv1d, torch.conv1d)(_conv_fn(1, "conv1d"))
register_function(F.conv2d, torch.conv2d)(_conv_fn(2, "conv2d"))
register_function(F.conv3d, torch.conv3d)(_conv_fn(3, "conv3d"))


def _module_handler(m: nn.Module) -> ModuleHandler | None:
    for cls in type(m).__mro__:
        if cls in MODULE_RESIZERS:
            return MODULE_RESIZERS[cls]
    return None


def find_resizers(gm: fx.GraphModule, ndim: int | None = None) -> tuple[list[Resizer], list[Skip]]:
    """Every resizer and every skipped resizing op of ``gm``, in graph order.

    Resizers hidden inside leaf modules are reported as skipped, and so are resizers of another
    dimension than ``ndim`` (the input's spatial axes), e.g. a strided Conv1d over a 2-D model's tokens.
    """
    resizers: list[Resizer] = []
    skipped: list[Skip] = []
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        found: Found = None
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, DynOPoolNd):
                continue
            handler = _module_handler(m)
            if handler is not None:
                found = handler(node, m)
            elif any(_module_handler(sub) is not None and _is_strided(sub) for sub in m.modules()):
                found = Skip(node, type(m).__name__, "resizer inside a leaf module (not traced through)")
        elif node.op == "call_function" and node.target in FUNCTION_RESIZERS:
            found = FUNCTION_RESIZERS[node.target](node)
        if isinstance(found, Resizer) and ndim is not None and found.ndim != ndim:
            found = Skip(node, found.op, f"{found.ndim}-D resizer in a {ndim}-D model: kept")
        if isinstance(found, Resizer):
            resizers.append(found)
        elif isinstance(found, Skip):
            skipped.append(found)
    return resizers, skipped


def _is_strided(m: nn.Module) -> bool:
    stride = getattr(m, "stride", None)
    if stride is None or not isinstance(m, tuple(MODULE_NDIM)):
        return False
    return any(v != 1 for v in per_axis(stride, _module_ndim(m)))
