"""Finite differences of the GMACs loss's continuous relaxation (rounding removed)."""

from __future__ import annotations

import torch


def central_difference(graph, alpha: torch.Tensor, eps: float) -> list[float]:
    """d(relaxed GMACs)/d(alpha[axis]) for each axis by central differences; alpha is restored."""
    slopes = []
    for axis in range(2):
        with torch.no_grad():
            alpha[axis] += eps
            up = graph.gmacs(relaxed=True).item()
            alpha[axis] -= 2 * eps
            down = graph.gmacs(relaxed=True).item()
            alpha[axis] += eps
        slopes.append((up - down) / (2 * eps))
    return slopes
