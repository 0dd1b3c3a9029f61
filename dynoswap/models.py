"""One resolver for model names: torchvision, timm, user factories and saved dynoswap models.

Models are always built with random weights: nothing is ever downloaded
(torchvision ``weights=None``, timm ``pretrained=False``).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ModelError

if TYPE_CHECKING:
    from torch import nn

LIBRARIES = ("torchvision", "timm", "dynoswap", "user")
#: Library of a saved converted model in a ``ModelSource`` (``name`` is its path).
SAVED = "saved"
# Prefixes that force one library; the long names work too.
PREFIXES = {"tv": "torchvision", "torchvision": "torchvision", "timm": "timm", "dynoswap": "dynoswap"}
# Order in which a bare name is looked up.
LOOKUP_ORDER = ("torchvision", "timm", "dynoswap")
# A saved dynoswap model is a directory holding this file.
RECIPE_FILE = "recipe.json"


@dataclass
class ModelSource:
    """Where a model comes from, enough to build it again with random weights.

    Attributes:
        library: ``"torchvision"``, ``"timm"``, ``"dynoswap"`` (the zoo: ``vgg-tiny``,
            ``paper:vgg16``, ...), ``"user"`` (``"pkg.module:factory"``) or ``"saved"`` for a
            saved converted model (``name`` is then its path).
        name: Model name within the library.
        kwargs: Keyword arguments of the builder (e.g. ``num_classes``).
    """

    library: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"library": self.library, "name": self.name, "kwargs": dict(self.kwargs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSource:
        """Inverse of ``to_dict``."""
        return cls(library=str(data["library"]), name=str(data["name"]), kwargs=dict(data.get("kwargs") or {}))

    def build(self) -> nn.Module:
        """Build the model with random weights."""
        return build_model(self.library, self.name, self.kwargs)

    def __str__(self) -> str:
        return f"{self.library}:{self.name}"


# -- name lists ---------------------------------------------------------------
@functools.cache
def _torchvision_names() -> tuple[str, ...]:
    import torchvision.models

    return tuple(torchvision.models.list_models())


@functools.cache
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _zoo_names() -> tuple[str, ...]:
    from .zoo import zoo_names

    return zoo_names()


NAME_LISTS: dict[str, Callable[[], tuple[str, ...]]] = {
    "torchvision": _torchvision_names,
    "timm": _timm_names,
    "dynoswap": _zoo_names,
}


def _is_timm_name(name: str) -> bool:
    import timm

    # timm accepts pretrained tags ("resnet50.a1_in1k"); the architecture decides.
    return bool(timm.is_model(name.split(".", 1)[0]))


KNOWN: dict[str, Callable[[str], bool]] = {
    "torchvision": lambda name: name in _torchvision_names(),
    "timm": _is_timm_name,
    "dynoswap": lambda name: name in _zoo_names(),
}


# -- builders -----------------------------------------------------------------
def _build_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision.models

    builder = torchvision.models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    kwargs = dict(kwargs)
    kwargs["weights"] = None
    # Detection/segmentation builders default to a pretrained backbone: never download.
    if "weights_backbone" in params:
        kwargs.setdefault("weights_backbone", None)
    return builder(**kwargs)


def _build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    kwargs = dict(kwargs)
    kwargs["pretrained"] = False
    return timm.create_model(name, **kwargs)


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ModelError(f"user model {spec!r} must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import module {module_name!r} for user model {spec!r}: {exc}") from exc
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"module {module_name!r} has no attribute {attr!r} (user model {spec!r})")
    if not callable(factory):
        raise ModelError(f"user model {spec!r} is not callable")
    return factory


def _build_user(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from torch import nn

    model = _load_factory(name)(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"user factory {name!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _build_zoo(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from .zoo import build

    return build(name, kwargs)


BUILDERS: dict[str, Callable[[str, dict[str, Any]], nn.Module]] = {
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "dynoswap": _build_zoo,
    "user": _build_user,
}


def build_model(library: str, name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a model with random weights (never downloads).

    Args:
        library: ``"torchvision"``, ``"timm"`` or ``"user"``.
        name: Model name (``"package.module:factory"`` for ``"user"``).
        kwargs: Builder keyword arguments, e.g. ``{"num_classes": 10}``.

    Returns:
        The model, in training mode as the builders leave it.
    """
    builder = BUILDERS.get(library)
    if builder is None:
        raise ModelError(f"unknown model library {library!r}; expected one of {', '.join(LIBRARIES)}")
    try:
        return builder(name, dict(kwargs or {}))
    except ModelError:
        raise
    except TypeError as exc:
        # Wrong keyword arguments are a usage error: say which model and which arguments.
        raise ModelError(f"cannot build {library}:{name} with {kwargs or {}}: {exc}") from exc


# -- resolution ---------------------------------------------------------------
def is_saved_model(spec: str | Path) -> bool:
    """Whether ``spec`` is a directory written by ``dynoswap.save``."""
    path = Path(spec)
    return path.is_dir() and (path / RECIPE_FILE).is_file()


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
    if spec in _zoo_names():  # zoo names may contain a colon (paper:vgg16)
        return ("dynoswap",), spec
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in PREFIXES:
        return (PREFIXES[prefix],), rest
    if sep:
        return ("user",), spec
    return LOOKUP_ORDER, spec


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
    spec: str, num_classes: int | None = None, model_kwargs: dict[str, Any] | None = None
) -> tuple[nn.Module, ModelSource]:
    """Build the model a spec names; a saved dynoswap model directory is loaded.

    Args:
        spec: A model name (see ``resolve_source``) or the path of a saved dynoswap model.
        num_classes: Number of classes (not allowed with a saved model).
        model_kwargs: Further builder keyword arguments (not allowed with a saved model).

    Returns:
        The model (random weights unless loaded from a saved model) and its source;
        a saved model has source library ``"saved"`` and its path as name.
    """
    spec = str(spec)
    if is_saved_model(spec):
        if num_classes is not None or model_kwargs:
            raise ModelError(f"{spec} is a saved dynoswap model: --num-classes/--model-kwargs do not apply")
        from .io.saving import load

        return load(spec), ModelSource(SAVED, spec, {})
    try:
        source = resolve_source(spec, num_classes, model_kwargs)
    except ModelError:
        # A path that is not a saved model deserves its own message, not name suggestions.
        if Path(spec).is_dir():
            raise ModelError(f"{spec} is a directory without {RECIPE_FILE}: not a saved dynoswap model") from None
        if Path(spec).exists():
            raise ModelError(f"{spec} is a file, not a model name; pass checkpoints with --weights") from None
        raise
    return source.build(), source


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
