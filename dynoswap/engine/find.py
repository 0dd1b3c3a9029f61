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
from ..layers import DynOPool2d


@dataclass
class Resizer:
    """A downsampling op the engine rewrites.

    Attributes:
        node: The fx node.
        kind: ``"pool"``, ``"conv"`` or ``"patchify"`` (a conv whose kernel equals its stride).
        op: What it was (module class or function name).
        stride: (s_h, s_w).
        kernel: (k_h, k_w).
        aggregate: DynOPool aggregate that matches the op (``"max"`` or ``"mean"``).
        padding: (p_h, p_w), or a padding string (``"same"``).
        ceil_mode: A pool that rounds its output size up.
    """

    node: fx.Node
    kind: str
    op: str
    stride: tuple[int, int]
    kernel: tuple[int, int]
    aggregate: str = "max"
    padding: tuple[int, int] | str = (0, 0)
    ceil_mode: bool = False

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


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(value)
    return (int(values[0]), int(values[0])) if len(values) == 1 else (int(values[0]), int(values[1]))


def _pool_found(
    node: fx.Node, op: str, kernel: Any, stride: Any, aggregate: str, padding: Any = 0, ceil_mode: Any = False
) -> Found:
    if any(isinstance(v, fx.Node) for v in (kernel, stride, padding, ceil_mode)) or kernel is None:
        return Skip(node, op, "kernel or stride is computed at run time")
    stride = kernel if stride is None or stride == [] or stride == () else stride
    s, k = _pair(stride), _pair(kernel)
    if s == (1, 1):
        return None
    return Resizer(node, "pool", op, s, k, aggregate, _pair(padding), bool(ceil_mode))


@register_module(nn.MaxPool2d)
def _max_pool_module(node: fx.Node, m: nn.Module) -> Found:
    return _pool_found(node, type(m).__name__, m.kernel_size, m.stride, "max", m.padding, m.ceil_mode)


@register_module(nn.AvgPool2d)
def _avg_pool_module(node: fx.Node, m: nn.Module) -> Found:
    return _pool_found(node, type(m).__name__, m.kernel_size, m.stride, "mean", m.padding, m.ceil_mode)


def _adaptive(node: fx.Node, m: nn.Module) -> Found:
    return Skip(node, type(m).__name__, "adaptive/global pool: fixed output size, kept")


register_module(nn.AdaptiveAvgPool2d)(_adaptive)
register_module(nn.AdaptiveMaxPool2d)(_adaptive)


@register_module(nn.Conv2d)
def _conv_module(node: fx.Node, m: nn.Module) -> Found:
    s, k = _pair(m.stride), _pair(m.kernel_size)
    if s == (1, 1):
        return None
    padding = m.padding if isinstance(m.padding, str) else _pair(m.padding)
    patchify = k == s and padding in ((0, 0), "valid")
    return Resizer(node, "patchify" if patchify else "conv", type(m).__name__, s, k, "max", padding)


def _arg(node: fx.Node, index: int, key: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(key, default)


@register_function(F.max_pool2d, torch.max_pool2d)
def _max_pool_fn(node: fx.Node) -> Found:
    return _pool_found(
        node,
        "max_pool2d",
        _arg(node, 1, "kernel_size"),
        _arg(node, 2, "stride"),
        "max",
        _arg(node, 3, "padding", 0),
        _arg(node, 5, "ceil_mode", False),
    )


@register_function(F.avg_pool2d, torch._C._nn.avg_pool2d)
def _avg_pool_fn(node: fx.Node) -> Found:
    return _pool_found(
        node,
        "avg_pool2d",
        _arg(node, 1, "kernel_size"),
        _arg(node, 2, "stride"),
        "mean",
        _arg(node, 3, "padding", 0),
        _arg(node, 4, "ceil_mode", False),
    )


@register_function(F.conv2d, torch.conv2d)
def _conv_fn(node: fx.Node) -> Found:
    stride = _arg(node, 3, "stride", 1)
    if isinstance(stride, fx.Node) or _pair(stride) != (1, 1):
        return Skip(node, "conv2d", "functional strided conv2d: its weight is not a module the engine can rewrite")
    return None


def _module_handler(m: nn.Module) -> ModuleHandler | None:
    for cls in type(m).__mro__:
        if cls in MODULE_RESIZERS:
            return MODULE_RESIZERS[cls]
    return None


def find_resizers(gm: fx.GraphModule) -> tuple[list[Resizer], list[Skip]]:
    """Every resizer and every skipped resizing op of ``gm``, in graph order.

    Resizers hidden inside leaf modules are reported as skipped.
    """
    resizers: list[Resizer] = []
    skipped: list[Skip] = []
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        found: Found = None
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, DynOPool2d):
                continue
            handler = _module_handler(m)
            if handler is not None:
                found = handler(node, m)
            elif any(_module_handler(sub) is not None and _is_strided(sub) for sub in m.modules()):
                found = Skip(node, type(m).__name__, "resizer inside a leaf module (not traced through)")
        elif node.op == "call_function" and node.target in FUNCTION_RESIZERS:
            found = FUNCTION_RESIZERS[node.target](node)
        if isinstance(found, Resizer):
            resizers.append(found)
        elif isinstance(found, Skip):
            skipped.append(found)
    return resizers, skipped


def _is_strided(m: nn.Module) -> bool:
    stride = getattr(m, "stride", None)
    return stride is not None and isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and _pair(stride) != (1, 1)
