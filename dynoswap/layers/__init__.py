"""Building blocks: one layer per file."""

from .dynopool import DynOPool2d, query_positions
from .sizing import MIN_SIZE, cells, output_size, straight_through_size

__all__ = ["DynOPool2d", "MIN_SIZE", "cells", "output_size", "query_positions", "straight_through_size"]
