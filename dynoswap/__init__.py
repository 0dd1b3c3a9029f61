"""dynoswap: put DynOPool's learnable resizing into any torchvision or timm CNN."""

from .cost import alphas, count_gmacs, gmacs_loss, param_groups, stage_sizes
from .engine import ConversionError, ConversionReport, TraceError, convert
from .io import load, save
from .layers import DynOPool2d
from .models import ModelSource, build_model, resolve
from .presets import Preset, load_preset
from .train import fit
from .version import __version__

__all__ = [
    "ConversionError",
    "ConversionReport",
    "DynOPool2d",
    "ModelSource",
    "Preset",
    "TraceError",
    "convert",
    "load",
    "save",
    "__version__",
    "alphas",
    "build_model",
    "load_preset",
    "resolve",
    "count_gmacs",
    "gmacs_loss",
    "param_groups",
    "stage_sizes",
    "fit",
]
