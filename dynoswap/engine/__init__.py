"""Model surgery on torch.fx: trace -> find -> rewrite -> tie."""

from ..io.recipe import RECIPE_KEY
from .convert import convert
from .find import FUNCTION_RESIZERS, MODULE_RESIZERS, Resizer, Skip, find_resizers, register_function, register_module
from .report import ConversionError, ConversionReport, Replacement, Skipped
from .tie import TieError, TieFinder
from .trace import TraceError, trace

__all__ = [
    "FUNCTION_RESIZERS",
    "MODULE_RESIZERS",
    "RECIPE_KEY",
    "ConversionError",
    "ConversionReport",
    "Replacement",
    "Resizer",
    "Skip",
    "Skipped",
    "TieError",
    "TieFinder",
    "TraceError",
    "convert",
    "find_resizers",
    "register_function",
    "register_module",
    "trace",
]
