"""What a model costs: GMACs counting, stage sizes, the differentiable GMACs loss."""

from .count import GmacsCount, count_gmacs
from .handles import MACS_PER_OUTPUT
from .loss import alphas, gmacs_loss, param_groups
from .resolution import ResolutionGraph, resolution_graph
from .stages import original_stage_sizes, plain_stage_sizes, stage_sizes

__all__ = [
    "GmacsCount",
    "MACS_PER_OUTPUT",
    "ResolutionGraph",
    "alphas",
    "count_gmacs",
    "gmacs_loss",
    "param_groups",
    "resolution_graph",
    "original_stage_sizes",
    "plain_stage_sizes",
    "stage_sizes",
]
