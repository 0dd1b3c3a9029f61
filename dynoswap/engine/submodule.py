"""Converting one part of a model: ``convert(model, input_size, submodule="backbone")``.

A detector or a model with an untraceable forward is converted part by part: the part
(a submodule path) is converted like a whole model, at its own input size, and put back
in place in a copy of the model. The whole model carries the recipe in its ``meta`` dict,
with the part's path in ``options.submodule``, so ``dynoswap.save``/``load``, ``freeze`` and
``export`` take the whole model. For a torchvision detector the anchor generators and RoI
poolers are replaced by their float-stride forms (:mod:`dynoswap.engine.anchors`), so anchors
and pooling follow the learned feature sizes (recorded as ``options.anchors``).

A path is resolved child by child (``named_children``), never by ``getattr``.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import ConversionError, OptionError
from ..io.recipe import ANCHORS, RECIPE_KEY, Recipe, part_of, raw_recipe_of, walk_part
from ..layers import DynOPoolNd
from ..sources import ModelSource
from ..validate import check_submodule_path
from .report import ConversionReport
from .tie import ALREADY, TieError
from .trace import TraceError, _contains_resizer

#: Most candidate parts an error message lists.
MAX_CANDIDATES = 6


def part_candidates(model: nn.Module, prefix: str = "") -> list[str]:
    """Children of ``model`` that hold a resizer (a pool or a strided conv), largest (in parameters) first."""
    found = [
        (sum(p.numel() for p in child.parameters()), f"{prefix}{name}")
        for name, child in model.named_children()
        if _contains_resizer(child)
    ]
    return [name for _, name in sorted(found, key=lambda item: -item[0])]


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_CANDIDATES])
    return shown + (f" and {len(names) - MAX_CANDIDATES} more" if len(names) > MAX_CANDIDATES else "")


def resolve_part(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``model`` at the dotted ``path``, child by child.

    Raises:
        OptionError: A malformed path, or one naming no submodule (the message lists the parts
            that hold resizers where the path went wrong).
    """
    check_submodule_path(path)
    module, walked, missing = walk_part(model, path)
    if missing is None:
        return module
    where = f"'{walked}'" if walked else type(model).__name__
    prefix = f"{walked}." if walked else ""
    names = part_candidates(module, prefix) or [prefix + n for n, _ in module.named_children()]
    hint = f"; parts with pools or strided convs: {_listing(names)}" if names else "; it has no submodules"
    raise OptionError(f"submodule '{path}' does not exist: {where} has no child '{missing}'{hint}")


def _set_part(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = resolve_part(model, parent_path) if parent_path else model
    setattr(parent, child, new)


def replace_part(model: nn.Module, new: nn.Module) -> nn.Module:
    """Return a copy of the whole ``model`` with its converted part replaced by ``new`` (the recipe copied too)."""
    path = part_of(model)
    if path is None:
        raise ConversionError("the model records no converted part (it was converted as a whole)")
    whole = copy.deepcopy(model)
    _set_part(whole, path, new)
    return whole


def with_part_hint(err: TraceError, model: nn.Module) -> TraceError:
    """Return ``err`` restated for a model whose own forward does not trace, naming the parts to convert instead.

    ``err`` itself when a submodule failed (marking it a leaf is the fix) or no child of ``model`` holds a resizer.
    """
    names = part_candidates(model) if not err.module else []
    if not names:
        return err
    cause = err.__cause__ if err.__cause__ is not None else err
    first = str(cause).strip().splitlines()[0].split(". ")[0].rstrip(".") if str(cause).strip() else ""
    at = f" at {err.line}" if err.line else ""
    message = (
        f"dynoswap cannot trace {type(model).__name__} as a whole ({first or type(cause).__name__}{at}). "
        f"Convert the part that holds its resizers instead: convert(model, input_size, submodule='{names[0]}') "
        f"or `dynoswap convert MODEL --submodule {names[0]}` (input size: that part's input). "
        f"Parts with pools or strided convs, largest first: {_listing(names)}"
    )
    return TraceError(message, module=err.module, line=err.line)


def _refuse_converted(model: nn.Module) -> None:
    path = part_of(model)
    if raw_recipe_of(model) is not None or any(isinstance(m, DynOPoolNd) for m in model.modules()):
        where = f" (its part '{path}')" if path else ""
        raise TieError(f"this model is already converted{where}: train it as it is, or convert the original", ALREADY)


def _anchors(whole: nn.Module, anchors: str | None) -> str | None:
    """Apply the anchor choice to ``whole``; return what the recipe records (None: the model has no anchors)."""
    if anchors is not None and anchors not in ANCHORS:
        raise OptionError(f"anchors must be one of {ANCHORS}, got {anchors!r}")
    if "torchvision" not in sys.modules:  # a torchvision detector imported it
        return None
    from .anchors import has_anchor_generator, use_float_strides

    if not has_anchor_generator(whole):
        return None
    if anchors == "integer":
        return anchors
    use_float_strides(whole)
    return "float"


def convert_part(
    model: nn.Module,
    submodule: str,
    input_size: Sequence[int],
    *,
    anchors: str | None = None,
    source: Any = None,
    **options: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Convert the part of ``model`` at ``submodule`` in a copy of ``model``; see :func:`dynoswap.convert`.

    Args:
        model: The whole model (not modified).
        submodule: Dotted path of the part, e.g. ``"backbone"``.
        input_size: The part's input size.
        anchors: ``"float"`` (default where the model has torchvision anchor generators) or ``"integer"``.
        source: ``ModelSource`` of the whole model (needed by ``dynoswap.save``).
        **options: The other options of :func:`dynoswap.convert`.

    Returns:
        The whole model, its part converted in place and the recipe in ``meta["dynoswap"]``, and the part's report.
    """
    from .convert import convert

    _refuse_converted(model)
    resolve_part(model, submodule)  # a bad path fails before the copy
    existing = getattr(model, "meta", None)
    if existing is not None and not isinstance(existing, dict):
        raise ConversionError(
            f"{type(model).__name__} has its own 'meta' attribute ({type(existing).__name__}), where dynoswap "
            "keeps a converted model's recipe; convert the part itself instead"
        )
    whole = copy.deepcopy(model)
    gm, report = convert(resolve_part(whole, submodule), input_size, **options)
    _set_part(whole, submodule, gm)
    recorded = _anchors(whole, anchors)
    recipe = Recipe.from_dict(gm.meta[RECIPE_KEY], "the part's recipe")
    src = source.to_dict() if hasattr(source, "to_dict") else (dict(source) if source is not None else None)
    recipe.source = ModelSource.from_dict(src) if src else None
    recipe.options.submodule = submodule
    recipe.options.anchors = recorded
    whole.meta = {**(existing or {}), RECIPE_KEY: recipe.to_dict()}  # type: ignore[assignment]
    report.model = f"{src['library']}:{src['name']}" if src else type(model).__name__
    report.submodule = submodule
    return whole, report
