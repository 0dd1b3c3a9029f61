"""DynOPool written directly from the paper's equations, with ``F.grid_sample``.

Slow but obviously right: it builds the full (N, 2*H_out, 2*W_out, 2) grid of
query points in normalised coordinates and lets ``grid_sample`` interpolate.
Used only by the tests as the ground truth for the fast layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_size(
    n_in: int, alpha: torch.Tensor, continuous: bool = False, floor_gradient: str = "pass"
) -> tuple[int, torch.Tensor]:
    """Integer cell count and the size used for the query positions along one axis.

    ``n_out = round(max(n_in / alpha, 1.5))`` (eq. 1, round half up). The positions
    use the straight-through size (value ``n_out``, gradient of ``n_in / alpha``, eq. 3-4),
    or with ``continuous=True`` the continuous relaxation ``max(n_in / alpha, 1.5)`` itself.
    Below the floor the gradient is that of ``n_in / alpha`` (``floor_gradient="pass"``,
    paper section 5) or zero (``"stop"``, the literal max).
    """
    raw = n_in / alpha
    if floor_gradient == "stop" or continuous:
        cont = torch.clamp_min(raw, 1.5)
    else:  # the value of max(raw, 1.5), the derivative of raw
        cont = raw + (torch.clamp_min(raw.detach(), 1.5) - raw.detach())
    count = int(torch.floor(cont.detach() + 0.5))
    if continuous:
        return count, cont
    return count, cont + (count - cont).detach()


def reference_coords(count: int, size: torch.Tensor) -> torch.Tensor:
    """Normalised coordinates of the two query points per cell: ``p_k -+ 1/(2 n)`` (eq. 2)."""
    k = torch.arange(count, dtype=size.dtype)
    centre = -1 + (2 * k + 1) / size
    half = 1 / (2 * size)
    return torch.stack([centre - half, centre + half], dim=1).reshape(-1)


def reference_dynopool(
    x: torch.Tensor,
    alpha: torch.Tensor,
    aggregate: str = "max",
    continuous: bool = False,
    floor_gradient: str = "pass",
) -> torch.Tensor:
    """DynOPool forward from the equations; differentiable in ``x`` and ``alpha``.

    Args:
        x: Input (N, C, H, W).
        alpha: Inverse scales (1/r_h, 1/r_w), shape (2,).
        aggregate: ``"max"`` or ``"mean"`` over each cell's four query values.
        continuous: Place the query points with the continuous size instead of the
            straight-through one (same cell count); for finite differences in alpha.
        floor_gradient: ``"pass"`` or ``"stop"``: the size's gradient below the 2-cell floor.
    """
    n, _, h, w = x.shape
    alpha = alpha.to(x.dtype)
    count_h, size_h = reference_size(h, alpha[0], continuous, floor_gradient)
    count_w, size_w = reference_size(w, alpha[1], continuous, floor_gradient)
    ys = reference_coords(count_h, size_h)
    xs = reference_coords(count_w, size_w)
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # (2h', 2w', (x, y))
    grid = grid.unsqueeze(0).expand(n, -1, -1, -1)
    queries = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    cells = queries.reshape(n, -1, count_h, 2, count_w, 2)
    if aggregate == "max":
        return cells.amax(dim=(3, 5))
    return cells.mean(dim=(3, 5))
