"""Bilinear sampling at DynOPool's query points, aggregated per output cell.

Query points of one axis are given as pixel coordinates ``u`` (the
``align_corners=False`` convention: pixel ``i`` has its centre at ``u = i``), two
per output cell, so a cell's four query points are the outer product of two
row and two column coordinates. Bilinear interpolation is then separable: a
query value is a lerp between two rows of a lerp between two columns, which is
far cheaper than ``grid_sample`` with a full (N, H, W, 2) grid.

Border handling and one-sided slopes follow ``F.grid_sample(...,
padding_mode="border", align_corners=False)`` exactly: a coordinate is clamped
to ``[0, n - 1]``; its gradient is zero where it is clamped *or* lies exactly on
the border; on a pixel centre the slope is taken towards the next pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AxisTable:
    """Interpolation table of one axis: neighbours, weights and slope mask."""

    lo: torch.Tensor  #: lower neighbour index, int64, shape (2n,)
    hi: torch.Tensor  #: upper neighbour index (clamped to the last pixel)
    frac: torch.Tensor  #: weight of ``hi``, in the positions' dtype
    inside: torch.Tensor  #: 1 where the coordinate is strictly inside (gradient flows), else 0
    exact: bool  #: every query point lies on a pixel centre (all weights 0)
    identity: bool  #: ``lo == arange(2n)`` and exact: sampling is a plain crop


def axis_table(pos: torch.Tensor, n_in: int) -> AxisTable:
    """Build the interpolation table for pixel coordinates ``pos`` on an axis of length ``n_in``."""
    pos = pos.detach()
    last = n_in - 1
    clamped = pos.clamp(0, last)
    lo = clamped.floor()
    frac = clamped - lo
    lo = lo.long()
    hi = (lo + 1).clamp_max(last)
    inside = ((pos > 0) & (pos < last)).to(pos.dtype)
    exact = bool((frac == 0).all())
    identity = exact and lo.numel() <= n_in and bool((lo == torch.arange(lo.numel(), device=lo.device)).all())
    return AxisTable(lo, hi, frac, inside, exact, identity)


def _lerp_axis(x: torch.Tensor, table: AxisTable, dim: int) -> torch.Tensor:
    """Sample ``x`` along ``dim`` at the table's coordinates."""
    if table.identity:
        return x.narrow(dim, 0, table.lo.numel())
    low = x.index_select(dim, table.lo)
    if table.exact:
        return low
    shape = [1] * x.dim()
    shape[dim] = -1
    w = table.frac.to(x.dtype).view(shape)
    return torch.lerp(low, x.index_select(dim, table.hi), w)


def sample_queries(x: torch.Tensor, rows: AxisTable, cols: AxisTable) -> torch.Tensor:
    """All query values, shape (N, C, 2*n_h, 2*n_w); the axis that shrinks more goes first."""
    if rows.lo.numel() / x.shape[-2] <= cols.lo.numel() / x.shape[-1]:
        return _lerp_axis(_lerp_axis(x, rows, 2), cols, 3)
    return _lerp_axis(_lerp_axis(x, cols, 3), rows, 2)


class _MaxQueryPool(torch.autograd.Function):
    """Max over each cell's four query values; backward routes through the winner only.

    Saves the input (already alive) and the winners' indices: the same as
    ``max_pool2d`` keeps.
    """

    @staticmethod
    def forward(ctx, x, pos_h, pos_w):  # type: ignore[override]
        rows = axis_table(pos_h, x.shape[-2])
        cols = axis_table(pos_w, x.shape[-1])
        queries = sample_queries(x, rows, cols)
        need_idx = any(ctx.needs_input_grad)
        if need_idx:
            out, idx = F.max_pool2d(queries, 2, 2, return_indices=True)
            ctx.save_for_backward(x, idx)
        else:
            out = F.max_pool2d(queries, 2, 2)
        ctx.tables = (rows, cols)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, idx = ctx.saved_tensors
        rows, cols = ctx.tables
        n, c, h, w = x.shape
        q_w = cols.lo.numel()
        flat_idx = idx.view(n, c, -1)
        r = torch.div(flat_idx, q_w, rounding_mode="floor")
        col = flat_idx - r * q_w
        g = grad_out.reshape(n, c, -1)
        h0, h1 = rows.lo[r], rows.hi[r]
        w0, w1 = cols.lo[col], cols.hi[col]
        dtype = x.dtype
        fh = rows.frac.to(dtype)[r]
        fw = cols.frac.to(dtype)[col]
        x_flat = x.reshape(n, c, h * w)

        # The four corners that can carry weight; exact axes have a single neighbour.
        corners = [(h0, w0, (1 - fh) if not rows.exact else None, (1 - fw) if not cols.exact else None)]
        if not cols.exact:
            corners.append((h0, w1, (1 - fh) if not rows.exact else None, fw))
        if not rows.exact:
            corners.append((h1, w0, fh, (1 - fw) if not cols.exact else None))
            if not cols.exact:
                corners.append((h1, w1, fh, fw))

        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x_flat, memory_format=torch.contiguous_format)
            for hh, ww, a, b in corners:
                weight = g
                if a is not None:
                    weight = weight * a
                if b is not None:
                    weight = weight * b
                grad_x.scatter_add_(2, hh * w + ww, weight)
            grad_x = grad_x.view(n, c, h, w)

        grad_h = grad_w = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            v00 = x_flat.gather(2, h0 * w + w0)
            v01 = x_flat.gather(2, h0 * w + w1)
            v10 = x_flat.gather(2, h1 * w + w0)
            if ctx.needs_input_grad[1]:
                slope_h = v10 - v00
                if not cols.exact:
                    v11 = x_flat.gather(2, h1 * w + w1)
                    slope_h = torch.lerp(slope_h, v11 - v01, fw)
                acc_dtype = torch.promote_types(rows.frac.dtype, dtype)
                grad_h = torch.zeros(rows.lo.numel(), dtype=acc_dtype, device=x.device)
                grad_h.index_add_(0, r.reshape(-1), (g * slope_h).reshape(-1).to(acc_dtype))
                grad_h = (grad_h * rows.inside).to(rows.frac.dtype)
            if ctx.needs_input_grad[2]:
                slope_w = v01 - v00
                if not rows.exact:
                    v11 = x_flat.gather(2, h1 * w + w1)
                    slope_w = torch.lerp(slope_w, v11 - v10, fh)
                acc_dtype = torch.promote_types(cols.frac.dtype, dtype)
                grad_w = torch.zeros(cols.lo.numel(), dtype=acc_dtype, device=x.device)
                grad_w.index_add_(0, col.reshape(-1), (g * slope_w).reshape(-1).to(acc_dtype))
                grad_w = (grad_w * cols.inside).to(cols.frac.dtype)
        return grad_x, grad_h, grad_w


def _differentiable_queries(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Autograd-friendly sampling along one axis, with grid_sample's clamp and slope conventions."""
    n_in = x.shape[dim]
    table = axis_table(pos, n_in)
    # Gradient flows only strictly inside (0, n-1), as grid_sample's border clamp does.
    frac = torch.where(table.inside.bool(), pos - table.lo.to(pos.dtype), table.frac)
    shape = [1] * x.dim()
    shape[dim] = -1
    w = frac.to(x.dtype).view(shape)
    return torch.lerp(x.index_select(dim, table.lo), x.index_select(dim, table.hi), w)


def pool_queries(x: torch.Tensor, pos_h: torch.Tensor, pos_w: torch.Tensor, aggregate: str) -> torch.Tensor:
    """Sample ``x`` at the query points and aggregate each 2x2 group.

    Args:
        x: Input, shape (N, C, H, W).
        pos_h: Row coordinates in pixels, two per output row, shape (2*n_h,).
        pos_w: Column coordinates in pixels, two per output column, shape (2*n_w,).
        aggregate: ``"max"`` (the paper's choice) or ``"mean"``.

    Returns:
        Tensor of shape (N, C, n_h, n_w).
    """
    if aggregate == "max":
        return _MaxQueryPool.apply(x, pos_h, pos_w)
    queries = _differentiable_queries(_differentiable_queries(x, pos_h, 2), pos_w, 3)
    return F.avg_pool2d(queries, 2, 2)
