"""One resolver for model names: torchvision, timm, dynoswap's zoo, user factories and saved models.

Models are always built with random weights: nothing is ever downloaded. What may be
built without opting in to user code is decided in :mod:`dynoswap.sources`.
"""

from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError
from .io.output import repair_if_needed
from .io.recipe import RECIPE_FILE, is_saved_model
from .io.run import is_run_folder
from .sources import (
    KNOWN,
    LIBRARIES,
    NAME_LISTS,
    SAVED,
    ModelSource,
    build_model,
    zoo_names,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "LIBRARIES",
    "SAVED",
    "ModelError",
    "ModelSource",
    "build_model",
    "is_saved_model",
    "list_models",
    "resolve",
    "resolve_source",
    "suggest",
]

# Prefixes that force one library; the long names work too.
PREFIXES = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm", "dynoswap": "dynoswap"}
# Order in which a bare name is looked up.
LOOKUP_ORDER = ("torchvision", "timm", "dynoswap")


# -- resolution ---------------------------------------------------------------
def suggest(name: str, count: int = 5) -> list[str]:
    """Closest known names across torchvision, timm and the zoo, as they are typed (``tv:NAME``)."""
    candidates: dict[str, str] = {}
    for library in reversed(LOOKUP_ORDER):  # torchvision wins a tie of names
        prefix = {"torchvision": "tv:", "dynoswap": ""}.get(library, f"{library}:")
        for known in NAME_LISTS[library]():
            candidates[known] = f"{prefix}{known}"
    close = difflib.get_close_matches(name.lower(), list(candidates), n=count, cutoff=0.6)
    return [candidates[c] for c in close]


def _unknown(spec: str, name: str, where: tuple[str, ...]) -> ModelError:
    hints = suggest(name)
    hint = f"; did you mean {', '.join(hints)}?" if hints else "; try `dynoswap list PATTERN`"
    return ModelError(f"unknown model {spec!r} (not in {' or '.join(where)}){hint}")


def _split_spec(spec: str) -> tuple[tuple[str, ...], str]:
    """Libraries to try and the bare name, from a spec like ``tv:resnet50``."""
    if spec in zoo_names():  # zoo names may contain a colon (paper:vgg16)
        return ("dynoswap",), spec
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXES:
        return (PREFIXES[prefix],), rest
    if sep:
        return ("user",), spec
    return LOOKUP_ORDER, spec


def names_user_code(spec: str) -> bool:
    """Whether a spec names a user factory (``pkg.module:factory``) rather than a library's model."""
    return _split_spec(spec)[0] == ("user",)


def resolve_source(
    spec: str, num_classes: int | None = None, model_kwargs: dict[str, Any] | None = None
) -> ModelSource:
    """Turn a model spec into a ``ModelSource`` without building it.

    Args:
        spec: ``resnet50`` (torchvision first, then timm), ``tv:NAME`` / ``timm:NAME``
            (one library), or ``package.module:factory`` (a user model).
        num_classes: Number of classes, passed to the builder when given.
        model_kwargs: Further builder keyword arguments.
    """
    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    libraries, name = _split_spec(spec)
    if libraries == ("user",):
        return ModelSource("user", name, kwargs)
    for library in libraries:
        if KNOWN[library](name):
            return ModelSource(library, name, kwargs)
    raise _unknown(spec, name, libraries)


def resolve(
    spec: str,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
    *,
    trust_code: bool = False,
    strict_values: bool = False,
) -> tuple[nn.Module, ModelSource]:
    """Build the model a spec names; a saved dynoswap model directory is loaded.

    Args:
        spec: A model name (see ``resolve_source``), the path of a saved dynoswap model, or a
            training run folder (its final model, see :func:`dynoswap.io.run.run_model_folder`).
        num_classes: Number of classes (not allowed with a saved model).
        model_kwargs: Further builder keyword arguments (not allowed with a saved model).
        trust_code: Allow user factories and user leaf modules (see :mod:`dynoswap.sources`).
        strict_values: Refuse saved weights holding NaN or infinity instead of warning.

    Returns:
        The model (random weights unless loaded from a saved model) and its source;
        a saved model has source library ``"saved"`` and its path as name.
    """
    spec = str(spec)
    # A writer killed in the middle of replacing a saved model: finish or roll back its swap first.
    repair_if_needed(spec)
    if is_saved_model(spec) or is_run_folder(spec):  # a training run is used through its final model
        if num_classes is not None or model_kwargs:
            raise ModelError(f"{spec} is a saved dynoswap model: num_classes and model kwargs do not apply to it")
        from .io.saving import load

        return load(spec, trust_code=trust_code, strict_values=strict_values), ModelSource(SAVED, spec, {})
    try:
        source = resolve_source(spec, num_classes, model_kwargs)
    except ModelError as exc:
        # A path that is not a saved model deserves its own message, not name suggestions.
        if Path(spec).is_dir():
            raise ModelError(f"{spec} is a directory without {RECIPE_FILE}: not a saved dynoswap model") from exc
        if Path(spec).exists():
            raise ModelError(f"{spec} is a file, not a model name; load checkpoints into a named model") from exc
        raise
    return source.build(trust_code=trust_code), source


def list_models(pattern: str | None = None, source: str | None = None) -> list[tuple[str, str]]:
    """Known model names matching an fnmatch pattern.

    Args:
        pattern: fnmatch pattern such as ``"resnet*"``; all names when None.
        source: ``"tv"``/``"torchvision"`` or ``"timm"``; both when None.

    Returns:
        Sorted ``(library, name)`` pairs, torchvision first.
    """
    if source is not None and source not in PREFIXES:
        raise ModelError(f"unknown source {source!r}; expected tv, torchvision or timm")
    libraries = (PREFIXES[source],) if source else LOOKUP_ORDER
    rows: list[tuple[str, str]] = []
    for library in libraries:
        names = NAME_LISTS[library]()
        if pattern:
            names = tuple(fnmatch.filter(names, pattern))
        rows.extend((library, n) for n in sorted(names))
    return rows
