"""dynoswap: put DynOPool's learnable resizing into any torchvision or timm CNN."""

from .layers import DynOPool2d
from .version import __version__

__all__ = ["DynOPool2d", "__version__"]
