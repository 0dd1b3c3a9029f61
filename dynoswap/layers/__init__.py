"""Building blocks: one layer per file."""

from ..validate import FLOOR_GRADIENTS, POSITION_GRADIENTS
from .dynopool import DynOPool1d, DynOPool2d, DynOPool3d, DynOPoolNd, query_positions
from .sizing import MIN_SIZE, cells, continuous_size, output_size, straight_through_size

__all__ = [
    "DynOPool1d",
    "DynOPool2d",
    "DynOPool3d",
    "DynOPoolNd",
    "FLOOR_GRADIENTS",
    "MIN_SIZE",
    "POSITION_GRADIENTS",
    "continuous_size",
    "cells",
    "output_size",
    "query_positions",
    "straight_through_size",
]
