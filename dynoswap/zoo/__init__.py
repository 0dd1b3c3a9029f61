"""dynoswap's own models: a registry of trusted factories, resolved by name.

The zoo is the third trusted model library beside torchvision and timm: a saved
model or a config may name a zoo model, and loading it imports nothing outside
dynoswap. Entries name their factory as ``"dynoswap.<module>:<function>"`` and
are imported only when built, so listing the zoo stays cheap.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ModelError

if TYPE_CHECKING:
    from torch import nn

#: Library name of zoo models in a ``ModelSource``.
LIBRARY = "dynoswap"


@dataclass(frozen=True)
class ZooEntry:
    """One registered model.

    Attributes:
        name: The name users type, e.g. ``vgg-tiny`` or ``paper:vgg16``.
        factory: ``"dynoswap.<module>:<function>"`` building the model with random weights.
        description: One line for ``dynoswap list``.
        arch_kwargs: Keyword arguments the factory accepts from a recipe or the command line.
    """

    name: str
    factory: str
    description: str = ""
    arch_kwargs: tuple[str, ...] = ("num_classes",)

    def load_factory(self) -> Callable[..., nn.Module]:
        """Import the factory (always inside the dynoswap package)."""
        module, _, attr = self.factory.partition(":")
        fn: Any = importlib.import_module(module)
        for part in attr.split("."):
            fn = getattr(fn, part)
        return fn


_ZOO: dict[str, ZooEntry] = {}


def register_model(
    name: str, factory: str, *, description: str = "", arch_kwargs: Iterable[str] = ("num_classes",)
) -> ZooEntry:
    """Add a model to the zoo; replacing an existing name warns.

    Args:
        name: The name users type.
        factory: ``"dynoswap.<module>:<function>"``; only dynoswap's own modules are allowed.
        description: One line for ``dynoswap list``.
        arch_kwargs: Keyword arguments the factory accepts (an allow-list: others are refused).
    """
    if not factory.startswith("dynoswap.") or ":" not in factory:
        raise ValueError(f"zoo factory {factory!r} must look like 'dynoswap.<module>:<function>'")
    if name in _ZOO:
        warnings.warn(f"dynoswap zoo: replacing the model registered as {name!r}", stacklevel=2)
    entry = ZooEntry(name, factory, description, tuple(arch_kwargs))
    _ZOO[name] = entry
    return entry


def is_zoo_model(name: str) -> bool:
    """Whether ``name`` is registered."""
    _register_builtin()
    return name in _ZOO


def get_entry(name: str) -> ZooEntry:
    """Return the entry registered as ``name``."""
    _register_builtin()
    if name not in _ZOO:
        raise ModelError(f"unknown dynoswap model {name!r}; known: {', '.join(sorted(_ZOO))}")
    return _ZOO[name]


def zoo_names() -> tuple[str, ...]:
    """Return the registered names, sorted."""
    _register_builtin()
    return tuple(sorted(_ZOO))


def name_of_factory(factory: str) -> str | None:
    """Return the name registered for ``factory`` (``"dynoswap.<module>:<function>"``), if any."""
    _register_builtin()
    return next((entry.name for entry in _ZOO.values() if entry.factory == factory), None)


def build(name: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a zoo model with random weights; keyword arguments outside its allow-list are refused."""
    entry = get_entry(name)
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(entry.arch_kwargs))
    if unknown:
        raise ModelError(
            f"dynoswap model {name!r} does not take {', '.join(unknown)}; it takes {', '.join(entry.arch_kwargs)}"
        )
    for key in ("num_classes", "in_chans"):  # every zoo model's counts: refused before a layer is made
        value = kwargs.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelError(f"dynoswap model {name!r}: {key} must be a whole number >= 1, got {value!r}")
    return entry.load_factory()(**kwargs)


_BUILTIN_DONE = False


def _register_builtin() -> None:
    # Built-in entries are registered on first use so that importing the registry stays cheap.
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    register_model(
        "vgg-tiny",
        "dynoswap.train.models:small_vgg",
        description="small CIFAR-style VGG of the built-in experiments (4 stages, 3 max pools)",
        arch_kwargs=("num_classes", "in_chans", "widths", "convs_per_stage"),
    )
    register_model(
        "m5",
        "dynoswap.zoo.audio:m5",
        description="M5 raw-waveform 1-D CNN (Dai et al. 2017): conv 80/4, 3 convs, 4 max pools of 4; L >= 1024",
        arch_kwargs=("num_classes", "in_chans", "width"),
    )
    register_model(
        "resnet1d",
        "dynoswap.zoo.audio:resnet1d",
        description="1-D ResNet of basic blocks for spectrograms and time series (ResNet-18 layout)",
        arch_kwargs=("num_classes", "in_chans", "width", "layers"),
    )
    register_model(
        "video-tiny",
        "dynoswap.zoo.video:video_tiny",
        description="small VGG-style 3-D CNN for clips (4 stages, 3 isotropic 2x2x2 max pools); T, H, W >= 8",
        arch_kwargs=("num_classes", "in_chans", "width", "widths"),
    )
    from .paper import register_paper_models

    register_paper_models()
