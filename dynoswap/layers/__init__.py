"""Building blocks: one layer per file."""

from .dynopool import DynOPool2d, query_positions
from .sizing import FLOOR_GRADIENTS, MIN_SIZE, cells, continuous_size, output_size, straight_through_size

__all__ = [
    "DynOPool2d",
    "FLOOR_GRADIENTS",
    "MIN_SIZE",
    "continuous_size",
    "cells",
    "output_size",
    "query_positions",
    "straight_through_size",
]
