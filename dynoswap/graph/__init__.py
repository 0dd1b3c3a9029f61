"""One resolution analysis for the whole library: which size each tensor has, as an expression.

The engine ties DynOPool scales with it; the cost model evaluates feature-map sizes with it.
"""

from .propagate import (
    MetaParams,
    NodeFailure,
    OpError,
    World,
    WorldRunner,
    eval_mode,
    make_worlds,
    pool_size,
    shape_of,
    spatial_dims,
)
from .resolution import IN, Expr, Resolution, UnionFind, analyse, describe, node_label, tensor_inputs, unify
from .sizes import SIZE_RULES, SizeRule

__all__ = [
    "IN",
    "SIZE_RULES",
    "Expr",
    "MetaParams",
    "NodeFailure",
    "OpError",
    "Resolution",
    "SizeRule",
    "UnionFind",
    "World",
    "WorldRunner",
    "analyse",
    "describe",
    "eval_mode",
    "make_worlds",
    "node_label",
    "pool_size",
    "shape_of",
    "spatial_dims",
    "tensor_inputs",
    "unify",
]
