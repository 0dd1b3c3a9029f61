"""dynoswap: put DynOPool's learnable resizing into any torchvision or timm CNN."""

from .cost import alphas, count_gmacs, gmacs_loss, param_groups, stage_sizes
from .layers import DynOPool2d
from .version import __version__

__all__ = [
    "DynOPool2d",
    "__version__",
    "alphas",
    "count_gmacs",
    "gmacs_loss",
    "param_groups",
    "stage_sizes",
]
