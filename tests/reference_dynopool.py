"""DynOPool written directly from the paper's equations, with ``F.grid_sample``, in 1, 2 and 3 dimensions.

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


def reference_coords(count: int, size: torch.Tensor, position_gradient: str = "displacement") -> torch.Tensor:
    """Normalised coordinates of the two query points per cell: ``p_k -+ 1/(2 n)`` (eq. 2).

    ``position_gradient="displacement"`` places the centres ``p_k`` on the integer grid of ``count``
    cells (no gradient), so only the displacement ``1/(2 n)`` follows ``size``; ``"position"`` lets
    both follow it.
    """
    k = torch.arange(count, dtype=size.dtype)
    centre = -1 + (2 * k + 1) / (size if position_gradient == "position" else float(count))
    half = 1 / (2 * size)
    return torch.stack([centre - half, centre + half], dim=1).reshape(-1)


def reference_dynopool(
    x: torch.Tensor,
    alpha: torch.Tensor,
    aggregate: str = "max",
    continuous: bool = False,
    floor_gradient: str = "pass",
    position_gradient: str = "displacement",
) -> torch.Tensor:
    """DynOPool forward from the equations; differentiable in ``x`` and ``alpha``.

    Args:
        x: Input (N, C, H, W).
        alpha: Inverse scales (1/r_h, 1/r_w), shape (2,).
        aggregate: ``"max"`` or ``"mean"`` over each cell's four query values.
        continuous: Place the query points with the continuous size instead of the
            straight-through one (same cell count); for finite differences in alpha.
        floor_gradient: ``"pass"`` or ``"stop"``: the size's gradient below the 2-cell floor.
        position_gradient: ``"displacement"`` or ``"position"``, as in :func:`reference_coords`.
    """
    n, _, h, w = x.shape
    alpha = alpha.to(x.dtype)
    count_h, size_h = reference_size(h, alpha[0], continuous, floor_gradient)
    count_w, size_w = reference_size(w, alpha[1], continuous, floor_gradient)
    ys = reference_coords(count_h, size_h, position_gradient)
    xs = reference_coords(count_w, size_w, position_gradient)
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), dim=-1)  # (2h', 2w', (x, y))
    grid = grid.unsqueeze(0).expand(n, -1, -1, -1)
    queries = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    cells = queries.reshape(n, -1, count_h, 2, count_w, 2)
    if aggregate == "max":
        return cells.amax(dim=(3, 5))
    return cells.mean(dim=(3, 5))


def reference_dynopool_nd(
    x: torch.Tensor,
    alpha: torch.Tensor,
    aggregate: str = "max",
    continuous: bool = False,
    floor_gradient: str = "pass",
    position_gradient: str = "displacement",
) -> torch.Tensor:
    """:func:`reference_dynopool` for 1, 2 or 3 spatial axes: two query points per axis and cell.

    The grid of every query point, ``2**d`` per cell, goes to ``F.grid_sample`` (``bilinear``
    on a 5-D input is trilinear); a 1-D input is sampled as one row of pixels, whose row
    coordinate is its pixel centre. 2-D is :func:`reference_dynopool` itself.

    Args:
        x: Input (N, C, L), (N, C, H, W) or (N, C, T, H, W).
        alpha: Inverse scales, one per spatial axis.
        aggregate: ``"max"`` or ``"mean"`` over each cell's query values.
        continuous: As in :func:`reference_dynopool`.
        floor_gradient: As in :func:`reference_dynopool`.
        position_gradient: As in :func:`reference_dynopool`.
    """
    ndim = x.dim() - 2
    if ndim == 2:
        return reference_dynopool(x, alpha, aggregate, continuous, floor_gradient, position_gradient)
    n = x.shape[0]
    alpha = alpha.to(x.dtype)
    axes = [reference_size(side, alpha[i], continuous, floor_gradient) for i, side in enumerate(x.shape[2:])]
    counts = [count for count, _ in axes]
    coords = [reference_coords(count, size, position_gradient) for count, size in axes]  # in (T, H, W) order
    if ndim == 1:
        coords = [torch.zeros(1, dtype=x.dtype), *coords]  # one row: its centre is normalised 0
        x = x.unsqueeze(2)
    mesh = torch.meshgrid(*coords, indexing="ij")
    grid = torch.stack(mesh[::-1], dim=-1)  # grid_sample wants (x, y[, z]): the last axis first
    grid = grid.unsqueeze(0).expand(n, *grid.shape)
    queries = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if ndim == 1:
        queries = queries.squeeze(2)
    split = [v for count in counts for v in (count, 2)]
    cells = queries.reshape(n, -1, *split)
    pairs = tuple(range(3, 3 + 2 * ndim, 2))
    if aggregate == "max":
        return cells.amax(dim=pairs)
    return cells.mean(dim=pairs)
