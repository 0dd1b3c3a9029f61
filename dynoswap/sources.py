"""Where a model comes from, and the policy that decides whether it may be built.

A ``ModelSource`` names a model in one library. Building one from a file that someone
else wrote (a saved model's recipe, a preset, a training checkpoint) must not run code
that the caller did not ask for, so :func:`check_source` runs before anything is
imported or called:

- ``torchvision`` and ``timm`` names are resolved through those libraries' own registries,
  and their keyword arguments must be architecture arguments (:data:`ARCH_KWARGS`);
  arguments that download or read files (:data:`FILE_KWARGS`) and path- or URL-like
  values are always refused: dynoswap builds random weights only.
- ``dynoswap`` names come from dynoswap's own registry (:mod:`dynoswap.zoo`), each with
  its own argument allow-list.
- ``user`` factories (``"pkg.module:factory"``) import and call arbitrary code: refused
  unless the caller passes ``trust_code=True``.

This module imports no heavy library at import time and nothing from :mod:`dynoswap.io`,
so the saving code can depend on it without a cycle.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ModelError, UntrustedCodeError

if TYPE_CHECKING:
    from torch import nn

#: Libraries a ``ModelSource`` may name.
LIBRARIES = ("torchvision", "timm", "dynoswap", "user")
#: Libraries built without opting in to user code.
TRUSTED_LIBRARIES = ("torchvision", "timm", "dynoswap")
#: Library of a saved converted model in a ``ModelSource`` (``name`` is its path); never inside a recipe.
SAVED = "saved"

#: Keyword arguments that make torchvision or timm download or read a file: never passed on.
FILE_KWARGS = frozenset(
    {
        "weights",
        "weights_backbone",
        "pretrained",
        "pretrained_backbone",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "checkpoint_path",
        "cache_dir",
        "model_dir",
        "file",
        "url",
        "hf_hub_id",
        "progress",
    }
)

#: Largest integer an architecture argument may hold (a crafted num_classes must not allocate without bound).
MAX_ARCH_INT = 1_000_000

#: Architecture arguments accepted per library: sizes, multipliers, drop rates, switches.
ARCH_KWARGS: dict[str, frozenset[str]] = {
    "torchvision": frozenset(
        {
            "num_classes",
            "width_mult",
            "round_nearest",
            "dropout",
            "attention_dropout",
            "stochastic_depth_prob",
            "layer_scale",
            "aux_logits",
            "aux_loss",
            "transform_input",
            "init_weights",
            "zero_init_residual",
            "groups",
            "width_per_group",
            "replace_stride_with_dilation",
            "growth_rate",
            "block_config",
            "num_init_features",
            "bn_size",
            "drop_rate",
            "memory_efficient",
            "reduced_tail",
            "dilated",
            "image_size",
            "patch_size",
            "trainable_backbone_layers",
            "min_size",
            "max_size",
            "num_keypoints",
        }
    ),
    "timm": frozenset(
        {
            "num_classes",
            "in_chans",
            "drop_rate",
            "drop_path_rate",
            "drop_block_rate",
            "proj_drop_rate",
            "attn_drop_rate",
            "pos_drop_rate",
            "patch_drop_rate",
            "global_pool",
            "img_size",
            "patch_size",
            "output_stride",
            "channel_multiplier",
            "depth_multiplier",
            "width_multiplier",
            "width_mult",
            "depth_mult",
            "width_factor",
            "stem_type",
            "stem_width",
            "fix_stem",
            "num_features",
            "class_token",
            "layer_scale_init_value",
            "act_layer",
            "pad_type",
            "scriptable",
            "exportable",
            "no_jit",
        }
    ),
}


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
        """Inverse of ``to_dict`` (no validation: files go through :class:`dynoswap.io.recipe.Recipe`)."""
        return cls(library=str(data["library"]), name=str(data["name"]), kwargs=dict(data.get("kwargs") or {}))

    def build(self, *, trust_code: bool = False) -> nn.Module:
        """Build the model with random weights, after :func:`check_source`."""
        return build_model(self.library, self.name, self.kwargs, trust_code=trust_code)

    def __str__(self) -> str:
        return f"{self.library}:{self.name}"


# -- registries -----------------------------------------------------------------------
@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Return torchvision's registered model names."""
    import torchvision.models

    return tuple(torchvision.models.list_models())


@functools.cache
def timm_names() -> tuple[str, ...]:
    """Return timm's registered architecture names."""
    import timm

    return tuple(timm.list_models())


def zoo_names() -> tuple[str, ...]:
    """Return dynoswap's registered model names."""
    from .zoo import zoo_names as names

    return names()


def is_timm_name(name: str) -> bool:
    """Whether timm knows the architecture (a pretrained tag such as ``.a1_in1k`` may follow)."""
    import timm

    return bool(timm.is_model(name.split(".", 1)[0]))


NAME_LISTS: dict[str, Callable[[], tuple[str, ...]]] = {
    "torchvision": torchvision_names,
    "timm": timm_names,
    "dynoswap": zoo_names,
}

KNOWN: dict[str, Callable[[str], bool]] = {
    "torchvision": lambda name: name in torchvision_names(),
    "timm": is_timm_name,
    "dynoswap": lambda name: name in zoo_names(),
}


# -- the policy -----------------------------------------------------------------------
def _file_like(value: Any) -> bool:
    """Whether a value could name a file or a URL (paths, ``hf-hub:``, ``http://``)."""
    if isinstance(value, str):
        return any(mark in value for mark in ("/", "\\", ":", "~")) or value.startswith(".")
    if isinstance(value, (list, tuple)):
        return any(_file_like(v) for v in value)
    if isinstance(value, dict):
        return True  # nested configs (pretrained_cfg and friends) are not architecture arguments
    return False


def _switched_off(value: Any) -> bool:
    """Whether a download/file argument asks for nothing (``weights=None``, ``pretrained=False``)."""
    return value is None or value is False


def _largest_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return abs(value)
    if isinstance(value, (list, tuple)):
        return max((_largest_int(v) for v in value), default=0)
    return 0


def _user_target(spec: str) -> tuple[str, str]:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ModelError(f"user model {spec!r} must look like 'package.module:factory'")
    return module, attr


def check_source(source: ModelSource, *, trust_code: bool = False, where: str = "", names: bool = True) -> None:
    """Refuse a source that would run untrusted code, download or read files; imports nothing of its own.

    Args:
        source: The source to check.
        trust_code: Allow ``user`` factories and keyword arguments outside the allow-list.
        where: Where the source was read from (a file), for the message.
        names: Also check that the library knows the name (this imports torchvision or timm); every
            trust rule applies either way.

    Raises:
        UntrustedCodeError: A user factory without ``trust_code``, or a file/download argument.
        ModelError: An unknown library or a name the library does not know.
    """
    at = f" (in {where})" if where else ""
    library, name, kwargs = source.library, source.name, source.kwargs
    if library == "user":
        entry = _zoo_entry_for_factory(name)
        if entry is not None:
            return check_source(ModelSource("dynoswap", entry, kwargs), trust_code=trust_code, where=where, names=names)
        module, attr = _user_target(name)
        if not trust_code:
            raise UntrustedCodeError(
                f"refused to import module {module!r} and call {attr}(**{kwargs!r}){at}: user code runs only "
                "when you trust it (trust_code=True)"
            )
        return
    if library not in TRUSTED_LIBRARIES:
        raise ModelError(f"unknown model library {library!r}{at}; expected one of {', '.join(LIBRARIES)}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ModelError(f"keyword arguments of {library}:{name}{at} must be a mapping of names to values")
    downloads = sorted(k for k in kwargs if k in FILE_KWARGS and not _switched_off(kwargs[k]))
    if downloads:
        raise UntrustedCodeError(
            f"refused {library}:{name}{at}: {', '.join(downloads)} would download or read files; "
            "dynoswap builds random weights only (load a checkpoint into the model instead)",
            trustable=False,
        )
    file_values = sorted(k for k, v in kwargs.items() if _file_like(v))
    if file_values:
        raise UntrustedCodeError(
            f"refused {library}:{name}{at}: {', '.join(f'{k}={kwargs[k]!r}' for k in file_values)} "
            "looks like a path or URL; architecture arguments are numbers, switches and short names",
            trustable=False,
        )
    too_big = sorted(k for k, v in kwargs.items() if _largest_int(v) > MAX_ARCH_INT)
    if too_big:
        raise ModelError(
            f"{library}:{name}{at}: {', '.join(f'{k}={kwargs[k]!r}' for k in too_big)} is out of range "
            f"(architecture integers are at most {MAX_ARCH_INT})"
        )
    if names and not KNOWN[library](name):
        raise ModelError(f"unknown {library} model {name!r}{at}")
    if library == "dynoswap":
        return  # the zoo checks its own allow-list when it builds
    extra = sorted(set(kwargs) - ARCH_KWARGS[library] - FILE_KWARGS)
    if extra and not trust_code:
        raise UntrustedCodeError(
            f"refused {library}:{name}{at}: {', '.join(extra)} is not an architecture argument dynoswap "
            f"passes on without trust_code=True (allowed: {', '.join(sorted(ARCH_KWARGS[library]))})"
        )


def _zoo_entry_for_factory(spec: str) -> str | None:
    """Return the zoo name whose factory is ``spec`` (older saves named zoo factories as user code)."""
    if not spec.startswith("dynoswap."):
        return None
    from .zoo import name_of_factory

    return name_of_factory(spec)


# -- builders ---------------------------------------------------------------------------
def _build_torchvision(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision.models

    builder = torchvision.models.get_model_builder(name)
    params = inspect.signature(builder).parameters
    kwargs = dict(kwargs)
    kwargs["weights"] = None
    # Detection/segmentation builders default to a pretrained backbone: never download.
    if "weights_backbone" in params:
        kwargs["weights_backbone"] = None
    return builder(**kwargs)


def _build_timm(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    kwargs = dict(kwargs)
    kwargs["pretrained"] = False
    return timm.create_model(name, **kwargs)


def _load_factory(spec: str) -> Callable[..., nn.Module]:
    module_name, attr = _user_target(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import module {module_name!r} for user model {spec!r}: {exc}") from exc
    factory: Any = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"module {module_name!r} has no attribute {attr!r} (user model {spec!r})")
    if not callable(factory):
        raise ModelError(f"user model {spec!r} is not callable")
    return factory


def _build_user(name: str, kwargs: dict[str, Any]) -> nn.Module:
    from torch import nn

    entry = _zoo_entry_for_factory(name)
    if entry is not None:
        return _build_zoo(entry, kwargs)
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


#: Most parameters an allow-listed architecture may have once a file's or a flag's arguments are applied
#: (4 GB in float32).
MAX_PARAMS = 1_000_000_000
#: Most parameter tensors such an architecture may have (a depth argument must not cost minutes of CPU).
MAX_PARAM_TENSORS = 10_000


class _TooLarge(Exception):
    pass


def check_size_estimate(library: str, name: str, kwargs: dict[str, Any], where: str = "") -> None:
    """Build the architecture on the meta device (no memory) and refuse it when it is too large.

    Parameters are counted as they are created, so a huge width or depth argument stops
    at :data:`MAX_PARAMS` parameters or :data:`MAX_PARAM_TENSORS` tensors instead of running
    on. A builder that cannot run on the meta device is left to the real build.

    Raises:
        ModelError: The arguments ask for more than the limits (names the file and the arguments).
    """
    import torch
    from torch.nn.modules.module import register_module_parameter_registration_hook

    at = f" in {where}" if where else ""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    tensors = params = 0

    def counted(module: nn.Module, param_name: str, param: Any) -> None:
        nonlocal tensors, params
        tensors += 1
        params += param.numel() if param is not None else 0
        if tensors > MAX_PARAM_TENSORS or params > MAX_PARAMS:
            raise _TooLarge

    handle = register_module_parameter_registration_hook(counted)
    try:
        with torch.device("meta"):
            BUILDERS[library](name, kwargs)
    except _TooLarge as exc:
        raise ModelError(
            f"{library}:{name}{at} with {args} asks for more than {MAX_PARAMS:,} parameters or "
            f"{MAX_PARAM_TENSORS:,} parameter tensors, the most dynoswap builds from arguments; refusing it"
        ) from exc
    except Exception:  # noqa: BLE001, S110 - the real build reports its own error
        pass
    finally:
        handle.remove()


def build_model(
    library: str, name: str, kwargs: dict[str, Any] | None = None, *, trust_code: bool = False, where: str = ""
) -> nn.Module:
    """Build a model with random weights (never downloads), after :func:`check_source`.

    Args:
        library: ``"torchvision"``, ``"timm"``, ``"dynoswap"`` or ``"user"``.
        name: Model name (``"package.module:factory"`` for ``"user"``).
        kwargs: Builder keyword arguments, e.g. ``{"num_classes": 10}``.
        trust_code: Allow user factories and arguments outside the allow-list.
        where: The file the source was read from, for messages.

    Returns:
        The model, in training mode as the builders leave it.
    """
    source = ModelSource(library, name, dict(kwargs or {}))
    check_source(source, trust_code=trust_code, where=where)
    # Download/file arguments that ask for nothing are dropped: the builders pass their own safe values.
    kwargs = dict(source.kwargs)
    if library in TRUSTED_LIBRARIES:
        kwargs = {k: v for k, v in kwargs.items() if k not in FILE_KWARGS}
        if kwargs:  # the defaults are known; arguments from a file or a flag are estimated first
            check_size_estimate(library, name, kwargs, where)
    # A third-party builder's error on the given arguments is the spec's fault; dynoswap's own zoo only
    # blames the arguments for what refuses them (TypeError, ValueError): anything else there is a bug.
    own = library == "dynoswap" or (library == "user" and _zoo_entry_for_factory(name) is not None)
    spec_errors: tuple[type[Exception], ...] = (TypeError, ValueError) if own else (Exception,)
    try:
        return BUILDERS[library](name, kwargs)
    except ModelError:
        raise
    except spec_errors as exc:
        # Wrong keyword arguments or values are a usage error: say which model and which arguments.
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot build {library}:{name} with {kwargs or {}}: {detail}") from exc
