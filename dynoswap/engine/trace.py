"""Symbolic tracing with timm's leaf modules/functions and a readable TraceError."""

from __future__ import annotations

import functools
import inspect
import os
import re
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..layers import DynOPoolNd
from .find import ADAPTIVE_POOLS, MODULE_NDIM
from .report import ConversionError
from .timm_kinds import register_timm_kinds

_TORCH_DIR = os.path.dirname(torch.__file__)
_ENGINE_DIR = os.path.dirname(__file__)

# Always leaves: the layer itself and every kind the engine rewrites or reads by module type.
ALWAYS_LEAF: tuple[type[nn.Module], ...] = (DynOPoolNd, *MODULE_NDIM, *ADAPTIVE_POOLS)

LeafSpec = str | type
#: Convs and pools of every dimension: what makes a timm leaf worth tracing through.
RESIZER_TYPES: tuple[type[nn.Module], ...] = tuple(MODULE_NDIM)


class TraceError(ConversionError):
    """A model that torch.fx cannot trace; names the module, the source line and the fix."""

    def __init__(self, message: str, module: str = "", line: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.line = line


def _timm_leaves() -> tuple[tuple[type, ...], tuple[Any, ...]]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but tracing plain torch models must not need it
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


def _contains_resizer(module: nn.Module) -> bool:
    # A timm leaf that holds strided convs/pools is traced through, so they can be rewritten.
    for sub in module.modules():
        stride = getattr(sub, "stride", None)
        if (
            isinstance(sub, RESIZER_TYPES)
            and stride is not None
            and any(v != 1 for v in (stride if isinstance(stride, (tuple, list)) else (stride,)))
        ):
            return True
    return False


class DynoTracer(fx.Tracer):
    """fx tracer with leaves by type or qualified name; remembers the module stack on failure."""

    def __init__(
        self, leaf_types: Sequence[type], leaf_names: Iterable[str], autowrap_functions: Sequence[Any] = ()
    ) -> None:
        super().__init__(autowrap_functions=tuple(autowrap_functions))
        self.leaf_types = tuple(leaf_types)
        self.leaf_names = set(leaf_names)
        self._dyno_stack: list[tuple[str, type]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:  # noqa: D102
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:  # noqa: D102
        self._dyno_stack.append((self.path_of_module(m), type(m)))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as err:
            if not hasattr(err, "_dynoswap_scope"):
                err._dynoswap_scope = list(self._dyno_stack)  # type: ignore[attr-defined]
            raise
        finally:
            self._dyno_stack.pop()


#: How torch.fx shows a traced value inside an error text, e.g. ``Proxy(getitem_2)``.
_PROXY = re.compile(r"Proxy\([^()]*\)")


def readable_cause(err: BaseException) -> str:
    """Return the first line of a traced op's error with torch.fx's proxies named in words ("a traced value")."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return _PROXY.sub("a traced value", line)


def _user_line(err: BaseException) -> str:
    frames = traceback.extract_tb(err.__traceback__)
    user = [f for f in frames if not f.filename.startswith((_TORCH_DIR, _ENGINE_DIR))]
    if not user:
        return ""
    f = user[-1]
    code = (f.line or "").strip()
    return f"{f.filename}:{f.lineno}" + (f" `{code}`" if code else "")


def _trace_error(model: nn.Module, err: Exception) -> TraceError:
    scope = getattr(err, "_dynoswap_scope", [])
    name, cls = scope[-1] if scope else ("", type(model))
    line = _user_line(err)
    where = f"module '{name}' ({cls.__name__})" if name else f"the forward of {cls.__name__}"
    cause = readable_cause(err)
    fix = (
        f"Mark it a leaf: convert(model, ..., leaf_modules=['{name}']) or leaf_modules=[{cls.__name__}]; "
        "resizers inside a leaf are left as they are."
        if name
        else "The model's own forward cannot be traced; wrap the untraceable part in a submodule and mark it "
        "a leaf with leaf_modules=[...]."
    )
    msg = f"torch.fx cannot trace {where}"
    if line:
        msg += f" at {line}"
    msg += f": {cause}. {fix}"
    return TraceError(msg, module=name, line=line)


def trace(model: nn.Module, leaf_modules: Sequence[LeafSpec] = ()) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule.

    timm's registered leaf modules stay opaque unless they hold a resizer (then they
    are traced through so the resizer can be rewritten, and made leaves only if that
    fails); timm's registered functions are wrapped.

    Args:
        model: The module to trace (not modified).
        leaf_modules: Extra leaves, by class or by qualified submodule name.

    Returns:
        The traced GraphModule.

    Raises:
        TraceError: tracing failed; the message names the module, the line and the fix.
    """
    timm_types, timm_functions = _timm_leaves()
    user_types = tuple(s for s in leaf_modules if isinstance(s, type))
    user_names = {s for s in leaf_modules if isinstance(s, str)}
    opaque_timm = set()
    for qualname, sub in model.named_modules():
        if timm_types and isinstance(sub, timm_types) and not _contains_resizer(sub):  # type: ignore[arg-type,unused-ignore]
            opaque_timm.add(qualname)
    leaf_types = ALWAYS_LEAF + register_timm_kinds() + user_types
    while True:
        try:
            tracer, graph = _trace_with_defaults(
                model, functools.partial(DynoTracer, leaf_types, user_names | opaque_timm, timm_functions)
            )
            break
        except Exception as err:
            # A timm leaf traced through because it held a resizer: fall back to keeping it opaque.
            scope = getattr(err, "_dynoswap_scope", [])
            fallback = next(
                (
                    n
                    for n, cls in reversed(scope)
                    if timm_types and issubclass(cls, timm_types) and n not in opaque_timm
                ),
                None,
            )
            if fallback is None:
                raise _trace_error(model, err) from err
            opaque_timm.add(fallback)
    name = type(model).__name__
    gm = fx.GraphModule(tracer.root, graph, name)
    gm.meta["dynoswap_leaves"] = sorted(user_names | opaque_timm)
    return gm


def default_args(model: nn.Module) -> dict[str, Any]:
    """Return the forward's parameters after the input that have a default, with it, to trace as constants.

    The converted model runs on one input, so these take their defaults. Traced as placeholders,
    ``if mask is not None:`` would take the branch the model takes with a mask (timm Hiera's
    masked-autoencoder path), and ``if attn_mask is not None or is_causal:`` could not be traced at all.
    """
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {
        p.name: p.default
        for p in params
        if p.default is not p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _trace_with_defaults(model: nn.Module, make_tracer: Callable[[], DynoTracer]) -> tuple[DynoTracer, fx.Graph]:
    """Trace with the forward's defaults as constants (:func:`default_args`); where that fails, as placeholders.

    A model that traces neither way (a torchvision detector, whose ``targets=None`` fails its own training
    check) raises the error of the placeholder trace, the one that says what torch.fx cannot follow.

    Returns:
        The tracer that traced and its graph.
    """
    defaults = default_args(model)
    if defaults:
        tracer = make_tracer()
        try:
            return tracer, tracer.trace(model, concrete_args=defaults)
        except Exception:  # noqa: BLE001, S110 - the placeholder trace below reports what fails
            pass
    tracer = make_tracer()
    return tracer, tracer.trace(model)
