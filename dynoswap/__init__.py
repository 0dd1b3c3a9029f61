"""dynoswap: put DynOPool's learnable resizing into any torchvision or timm CNN.

Public names load lazily (PEP 562), so ``dynoswap --help`` and light imports do
not pay for importing torch, torchvision and timm.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_names
from .version import __version__

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "DynOPool1d": "layers",
    "DynOPool2d": "layers",
    "DynOPool3d": "layers",
    "DynOPoolNd": "layers",
    "convert": "engine",
    "ConversionError": "engine",
    "ConversionReport": "engine",
    "TraceError": "engine",
    "save": "io",
    "load": "io",
    "count_gmacs": "cost",
    "stage_sizes": "cost",
    "gmacs_loss": "cost",
    "param_groups": "cost",
    "alphas": "cost",
    "ModelSource": "models",
    "build_model": "models",
    "resolve": "models",
    "Preset": "presets",
    "load_preset": "presets",
    "fit": "train",
    "load_data": "train",
    "make_loaders": "train",
    "DataBundle": "train",
    "freeze": "export",
    "export_model": "export",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from .cost import alphas, count_gmacs, gmacs_loss, param_groups, stage_sizes  # noqa: F401
    from .engine import ConversionError, ConversionReport, TraceError, convert  # noqa: F401
    from .export import export_model, freeze  # noqa: F401
    from .io import load, save  # noqa: F401
    from .layers import DynOPool1d, DynOPool2d, DynOPool3d, DynOPoolNd  # noqa: F401
    from .models import ModelSource, build_model, resolve  # noqa: F401
    from .presets import Preset, load_preset  # noqa: F401
    from .train import DataBundle, fit, load_data, make_loaders  # noqa: F401


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
