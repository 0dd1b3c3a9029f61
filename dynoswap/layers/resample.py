"""Linear sampling at DynOPool's query points, aggregated per output cell, in 1, 2 or 3 dimensions.

Query points of one axis are pixel coordinates ``u`` (the ``align_corners=False``
convention: pixel ``i`` has its centre at ``u = i``), two per output cell:
``u_j = n_in (2j + 1) / (4 n_out) - 1/2`` for ``j < 2 n_out``. That is exactly the
sampling grid of ``F.interpolate(x, size=2 n_out, mode="bilinear",
align_corners=False)``, so all query values of a layer come from one fast
interpolation pass and each cell's four values are a 2x2 block of the result.

Border handling and one-sided slopes follow ``F.grid_sample(...,
padding_mode="border", align_corners=False)`` exactly: a coordinate is clamped
to ``[0, n - 1]``; its gradient is zero where it is clamped *or* lies exactly on
the border; on a pixel centre the slope is taken towards the next pixel.

Max aggregation has a hand-written backward: the winner of each cell gets the
whole gradient (``max_pool2d``'s indices and backward). From there, the general
case gets the input and coordinate gradients from one fused
``grid_sampler_2d_backward`` pass. When every query point is a pixel (even
sizes at r = 0.5, the layer is then exactly ``MaxPool2d(2, 2)``), the input
gradient is ``max_pool2d``'s own and a coordinate's gradient is
``sum(grad * (x[i+1] - x[i]))`` along its axis, computed with batched matmuls
that never materialise the product. Inference skips the indices: the max of each
2x2 block is three elementwise maxima.

The same holds per axis in 1-D and 3-D: two query points per axis and cell (2 and 8
per cell), one ``F.interpolate`` pass (``linear``/``trilinear``), a 2-per-axis max or
mean pool. :func:`pool_queries` and :func:`traceable_pool_queries` take one coordinate
vector per axis; 2-D goes through the specialised kernels above, other dimensions
through :class:`_MaxQueryPoolNd`, whose backward is written for any dimension: the
winner's gradient, the interpolation's own backward for the input, and per axis
``sum(grad * slope)`` with the slope ``x[hi] - x[lo]`` interpolated along the other axes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_BLAS_DTYPES = (torch.float32, torch.float64)
_BLOCK = 16  #: column block of the diagonal matmuls: one cache line of float32


#: What a second derivative through a DynOPool says (torch's own message names no layer); ``{layer}`` is its class.
_NO_DOUBLE_BACKWARD = (
    "{layer} has no second derivative: its fused backward is first-order only, so a double backward "
    "(create_graph=True, e.g. a gradient penalty) cannot pass through it; freeze the model "
    "(dynoswap.export.freeze) for plain torch ops that have one"
)
NO_DOUBLE_BACKWARD = _NO_DOUBLE_BACKWARD.format(layer="DynOPool2d")
NO_DOUBLE_BACKWARD_ND = _NO_DOUBLE_BACKWARD.format(layer="DynOPool1d / DynOPool3d")


def first_order_only(message: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Like ``torch.autograd.function.once_differentiable``, with ``message`` as the error.

    The backward runs without recording a graph; when a graph was asked for (``create_graph=True``),
    its outputs point to a node that raises the message only if something really differentiates them.
    """
    return functools.partial(_first_order_only, message=message)


def _first_order_only(fn: Callable[..., Any], message: str) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(ctx: Any, *args: Any) -> Any:
        with torch.no_grad():
            outputs = fn(ctx, *args)
        if not torch.is_grad_enabled() or not any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return outputs
        outs = outputs if isinstance(outputs, tuple) else (outputs,)
        err_fn = torch._C._functions.DelayedError(message.encode(), len(outs))

        def fake_requires_grad(value: torch.Tensor | None) -> torch.Tensor | None:
            if value is None:
                return None
            value = value.detach()
            value.requires_grad = True
            return value

        return err_fn(*[fake_requires_grad(v) for v in outs])  # type: ignore[arg-type]  # None passes through

    return wrapper


@dataclass(frozen=True)
class AxisTable:
    """Interpolation table of one axis: neighbours, weights and slope mask."""

    pos: torch.Tensor  #: the query coordinates themselves (pixels), shape (2n,)
    lo: torch.Tensor  #: lower neighbour index, int64
    hi: torch.Tensor  #: upper neighbour index (clamped to the last pixel)
    frac: torch.Tensor  #: weight of ``hi``, in the positions' dtype
    inside: torch.Tensor  #: True where the coordinate is strictly inside (gradient flows)
    exact: bool  #: every query point lies on a pixel centre (all weights 0)
    identity: bool  #: ``lo == arange(n_in)``: sampling along this axis is a no-op

    @property
    def count(self) -> int:
        """Number of query coordinates (twice the output length)."""
        return self.lo.numel()


def _neighbours(pos: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lower and upper neighbour indices, weight of the upper one and the inside mask of coordinates ``pos``.

    Branch-free (no value is read back), so it traces under torch.compile and torch.export.
    """
    pos = pos.detach()
    last = n_in - 1
    clamped = pos.clamp(0, last)
    lo = clamped.floor()
    frac = clamped - lo
    lo = lo.long()
    hi = (lo + 1).clamp_max(last)
    inside = (pos > 0) & (pos < last)
    return lo, hi, frac, inside


def axis_table(pos: torch.Tensor, n_in: int) -> AxisTable:
    """Build the interpolation table for pixel coordinates ``pos`` on an axis of length ``n_in``."""
    lo, hi, frac, inside = _neighbours(pos, n_in)
    exact = bool((frac == 0).all())
    identity = exact and lo.numel() == n_in and bool((lo == torch.arange(n_in, device=lo.device)).all())
    return AxisTable(pos.detach(), lo, hi, frac, inside, exact, identity)


#: ``F.interpolate`` mode, max pool and mean pool of each number of spatial dimensions.
_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}
_MAX_POOLS: dict[int, Callable[..., Any]] = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOLS: dict[int, Callable[..., Any]] = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}
_UPSAMPLE_BACKWARD: dict[int, Callable[..., Any]] = {
    1: torch.ops.aten.upsample_linear1d_backward,
    2: torch.ops.aten.upsample_bilinear2d_backward,
    3: torch.ops.aten.upsample_trilinear3d_backward,
}


def interpolation_mode(ndim: int) -> str:
    """Return the ``F.interpolate`` mode that samples ``ndim`` axes linearly: linear, bilinear or trilinear."""
    return _MODES[ndim]


def sample_queries(x: torch.Tensor, tables: Sequence[AxisTable]) -> torch.Tensor:
    """All query values, shape (N, C, 2*n_1, ..., 2*n_d): one (multi)linear interpolation pass."""
    if all(t.identity for t in tables):
        return x
    return F.interpolate(x, size=tuple(t.count for t in tables), mode=_MODES[len(tables)], align_corners=False)


def _tables(x: torch.Tensor, positions: Sequence[torch.Tensor]) -> tuple[AxisTable, ...]:
    return tuple(axis_table(pos, n) for pos, n in zip(positions, x.shape[2:], strict=True))


def _max_of_blocks(q: torch.Tensor) -> torch.Tensor:
    """Max of each 2x2 block; three elementwise maxima beat ``max_pool2d`` when no indices are needed."""
    top = torch.maximum(q[:, :, 0::2, 0::2], q[:, :, 0::2, 1::2])
    bottom = torch.maximum(q[:, :, 1::2, 0::2], q[:, :, 1::2, 1::2])
    return torch.maximum(top, bottom)


def _blas_ready(*tensors: torch.Tensor) -> bool:
    """Whether the batched-matmul reductions apply: float32/64, plain contiguous layout."""
    return all(t.dtype in _BLAS_DTYPES and t.is_contiguous() for t in tensors)


def _pair_dots(g: torch.Tensor, x: torch.Tensor, step: int, acc: torch.dtype) -> torch.Tensor:
    """Per row ``r`` of two (R, W) contiguous matrices: ``g[r] . (x[r + step] - x[r])`` along the flat storage.

    ``x[r]`` and its successor are the two columns of one (W, 2) view, so one batched
    matmul reads ``g`` once for both dots. The last row has no successor: 0.
    """
    rows, width = g.shape
    out = torch.zeros(rows, dtype=acc, device=g.device)
    if rows > 1:
        pairs = x.as_strided((rows - 1, width, 2), (width, 1, step))
        dots = torch.bmm(g[:-1].unsqueeze(1), pairs).view(rows - 1, 2)
        out[:-1] = (dots[:, 1] - dots[:, 0]).to(acc)
    return out


def _pair_col_dots(g: torch.Tensor, x: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """Per column ``j`` of two (R, W) contiguous matrices: ``sum_r g[r, j] * (x[r, j+1] - x[r, j])``; last 0.

    Column sums of a product are diagonals of ``g.T @ x``; blocks of 16 columns of
    ``g`` against 17 columns of ``x`` give the diagonal and the one above it with one
    batched matmul that reads each operand once and never forms the product.
    """
    rows, width = g.shape
    out = torch.zeros(width, dtype=acc, device=g.device)
    blocks = (width - 1) // _BLOCK
    if blocks:
        left = g.as_strided((blocks, _BLOCK, rows), (_BLOCK, 1, width))
        right = x.as_strided((blocks, rows, _BLOCK + 1), (_BLOCK, width, 1))
        prod = torch.bmm(left, right)
        here = prod.diagonal(dim1=1, dim2=2)
        nxt = prod.diagonal(offset=1, dim1=1, dim2=2)
        out[: blocks * _BLOCK] = (nxt - here).reshape(-1).to(acc)
    start = blocks * _BLOCK
    prod = g[:, start:].t() @ x[:, start:]
    out[start:-1] = (prod.diagonal(offset=1) - prod.diagonal()[:-1]).to(acc)
    return out


def _identity_slopes(grad: torch.Tensor, x: torch.Tensor, acc: torch.dtype, dim: int) -> torch.Tensor:
    """``sum(grad[i] * (x[i+1] - x[i]))`` per index ``i`` along ``dim`` (the last one 0), ``x`` sampled as is."""
    n, c, h, w = x.shape
    length = x.shape[dim]
    if length == 1:
        return torch.zeros(1, dtype=acc, device=x.device)
    if not _blas_ready(grad, x):
        out = torch.zeros(length, dtype=acc, device=x.device)
        diff = x.narrow(dim, 1, length - 1) - x.narrow(dim, 0, length - 1)
        out[:-1] = (grad.narrow(dim, 0, length - 1) * diff).sum([d for d in range(4) if d != dim], dtype=acc)
        return out
    g2, x2 = grad.view(-1, w), x.view(-1, w)
    if dim == 3:
        return _pair_col_dots(g2, x2, acc)
    # Rows of all images stacked: row r pairs with row r + 1; the pairs that straddle two
    # images land on row h - 1, which is dropped.
    out = _pair_dots(g2, x2, w, acc).view(n * c, h).sum(0)
    out[-1] = 0
    return out


def _sampler_backward(
    grad_q: torch.Tensor, x: torch.Tensor, rows: AxisTable, cols: AxisTable, need_x: bool
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of the query values wrt the input and the query coordinates, in one fused pass.

    ``grid_sampler_2d_backward`` computes both from the (N, 2h, 2w, 2) grid of query
    points; its coordinate gradients are summed over the other axis and mapped from
    normalised to pixel units. Low-precision inputs are handled in float32, so the
    coordinates keep their precision.
    """
    n, _, h, w = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    acc = torch.promote_types(rows.pos.dtype, dtype)

    def sampler_grads(shift_h: float, shift_w: float, need_input: bool):
        grid_y = (2 * (rows.pos + shift_h) + 1) / h - 1  # pixel -> normalised (align_corners=False)
        grid_x = (2 * (cols.pos + shift_w) + 1) / w - 1
        grid = torch.stack(torch.broadcast_tensors(grid_x[None, :], grid_y[:, None]), dim=-1)
        grid = grid.to(dtype).expand(n, -1, -1, -1).contiguous()
        return torch.ops.aten.grid_sampler_2d_backward(
            grad_q.to(dtype), x.to(dtype), grid, 0, 1, False, [need_input, True]
        )

    grad_x, grad_grid = sampler_grads(0.0, 0.0, need_x)
    grad_h = grad_grid[..., 1].sum((0, 2), dtype=acc) * (2 / h)
    grad_w = grad_grid[..., 0].sum((0, 1), dtype=acc) * (2 / w)
    # On an axis whose points all sit on pixel centres, the normalise/unnormalise round
    # trip can land a hair below the centre and take the slope from the wrong side.
    # The slope is constant within a pixel interval, so a quarter-pixel shift up picks
    # the interval towards the next pixel (our convention) without changing its value.
    if rows.exact:
        grad_h = sampler_grads(0.25, 0.0, False)[1][..., 1].sum((0, 2), dtype=acc) * (2 / h)
    if cols.exact:
        grad_w = sampler_grads(0.0, 0.25, False)[1][..., 0].sum((0, 1), dtype=acc) * (2 / w)
    return (grad_x.to(x.dtype) if need_x else None), grad_h, grad_w


class _MaxQueryPool(torch.autograd.Function):
    """Max over each cell's four query values; backward routes through the winner only.

    Saves the input and the winners' indices, as ``max_pool2d`` does.
    """

    @staticmethod
    def forward(ctx, x, pos_h, pos_w):
        rows = axis_table(pos_h, x.shape[-2])
        cols = axis_table(pos_w, x.shape[-1])
        queries = sample_queries(x, (rows, cols))
        out, idx = F.max_pool2d(queries, 2, 2, return_indices=True)
        ctx.save_for_backward(x, idx)
        ctx.tables = (rows, cols)
        ctx.query_layout = tuple(queries.shape), _memory_format(queries)
        return out

    @staticmethod
    @first_order_only(NO_DOUBLE_BACKWARD)
    def backward(ctx, grad_out):
        x, idx = ctx.saved_tensors
        rows, cols = ctx.tables
        query_shape, fmt = ctx.query_layout
        identity = rows.identity and cols.identity
        like = torch.empty(query_shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        grad_q = torch.ops.aten.max_pool2d_with_indices_backward(
            grad_out.contiguous(memory_format=fmt), like, [2, 2], [2, 2], [0, 0], [1, 1], False, idx
        )
        need_x, need_h, need_w = ctx.needs_input_grad
        grad_x: torch.Tensor | None
        grad_h: torch.Tensor | None
        grad_w: torch.Tensor | None
        if not identity and (need_h or need_w):
            grad_x, grad_h, grad_w = _sampler_backward(grad_q, x, rows, cols, need_x)
        else:
            grad_x = grad_q if need_x and identity else None
            if need_x and not identity:
                grad_x = torch.ops.aten.upsample_bilinear2d_backward(
                    grad_q, [rows.count, cols.count], list(x.shape), False
                )
            acc_h = torch.promote_types(rows.pos.dtype, x.dtype)
            acc_w = torch.promote_types(cols.pos.dtype, x.dtype)
            grad_h = _identity_slopes(grad_q, x, acc_h, dim=2) if need_h else None
            grad_w = _identity_slopes(grad_q, x, acc_w, dim=3) if need_w else None
        # Zero where a coordinate is clamped or exactly on the border (grid_sample's rule).
        if grad_h is not None:
            grad_h = torch.where(rows.inside, grad_h, 0).to(rows.pos.dtype)
        if grad_w is not None:
            grad_w = torch.where(cols.inside, grad_w, 0).to(cols.pos.dtype)
        return grad_x, grad_h, grad_w


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _differentiable_queries(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    """Autograd-friendly sampling along one axis, with grid_sample's clamp and slope conventions."""
    lo, hi, frac, inside = _neighbours(pos, x.shape[dim])
    # Gradient flows only strictly inside (0, n-1), as grid_sample's border clamp does.
    frac = torch.where(inside, pos - lo.to(pos.dtype), frac)
    shape = [1] * x.dim()
    shape[dim] = -1
    w = frac.to(x.dtype).view(shape)
    index = (slice(None),) * dim
    return torch.lerp(x[index + (lo,)], x[index + (hi,)], w)


class _MaxQueryPoolNd(torch.autograd.Function):
    """Max over each cell's ``2**d`` query values in any dimension; backward through the winner only.

    Saves the input and the winners' indices. The backward scatters the output gradient
    to the winning query values, maps it to the input with the interpolation's own
    backward, and gives each axis ``sum(grad_q * slope)``: the slope ``x[hi] - x[lo]``
    along that axis, interpolated along the others (the derivative of a multilinear
    sample wrt one coordinate), zero where the coordinate is clamped or on the border.
    """

    @staticmethod
    def forward(ctx, x, *positions):
        tables = _tables(x, positions)
        queries = sample_queries(x, tables)
        out, idx = _MAX_POOLS[len(tables)](queries, 2, 2, return_indices=True)
        ctx.save_for_backward(x, idx)
        ctx.tables = tables
        ctx.query_shape = tuple(queries.shape)
        return out

    @staticmethod
    @first_order_only(NO_DOUBLE_BACKWARD_ND)
    def backward(ctx, grad_out):
        x, idx = ctx.saved_tensors
        tables: tuple[AxisTable, ...] = ctx.tables
        # Cells do not overlap: each query value wins at most one cell, so a scatter is the max's backward.
        grad_q = grad_out.new_zeros(ctx.query_shape).flatten(2)
        grad_q.scatter_(2, idx.reshape(*idx.shape[:2], -1), grad_out.reshape(*grad_out.shape[:2], -1))
        grad_q = grad_q.view(ctx.query_shape)
        need_x, *need_pos = ctx.needs_input_grad
        grad_x: torch.Tensor | None = None
        if need_x:
            counts = [t.count for t in tables]
            identity = all(t.identity for t in tables)
            grad_x = grad_q if identity else _UPSAMPLE_BACKWARD[len(tables)](grad_q, counts, list(x.shape), False)
        grads_pos = [_axis_slope_grad(grad_q, x, tables, axis) if need else None for axis, need in enumerate(need_pos)]
        return (grad_x, *grads_pos)


def _axis_slope_grad(grad_q: torch.Tensor, x: torch.Tensor, tables: Sequence[AxisTable], axis: int) -> torch.Tensor:
    """Gradient of ``sum(grad_q * queries)`` wrt the coordinates of ``axis``, with grid_sample's conventions."""
    dim = 2 + axis
    table = tables[axis]
    dtype = torch.promote_types(x.dtype, torch.float32)
    acc = torch.promote_types(table.pos.dtype, dtype)
    others = [d for d in range(x.dim()) if d != dim]
    if all(t.identity for t in tables):
        # Every query point is a sample (MaxPool's case): the slope is the next sample's difference.
        length = x.shape[dim]
        grad = torch.zeros(length, dtype=acc, device=x.device)
        if length > 1:
            diff = (x.narrow(dim, 1, length - 1) - x.narrow(dim, 0, length - 1)).to(dtype)
            grad[:-1] = (grad_q.narrow(dim, 0, length - 1).to(dtype) * diff).sum(others, dtype=acc)
        return torch.where(table.inside, grad, 0).to(table.pos.dtype)
    # x[hi] - x[lo] is the next sample's difference at lo (zero at the last sample, where hi == lo):
    # one gather of the differences instead of two of the samples.
    length = x.shape[dim]
    diff = torch.zeros_like(x, dtype=dtype)
    if length > 1:
        diff.narrow(dim, 0, length - 1).copy_(x.narrow(dim, 1, length - 1) - x.narrow(dim, 0, length - 1))
    slope = diff.index_select(dim, table.lo)
    if not all(t.identity for i, t in enumerate(tables) if i != axis):
        # Along ``axis`` the size is unchanged, so the interpolation copies it exactly.
        slope = F.interpolate(slope, size=tuple(t.count for t in tables), mode=_MODES[len(tables)], align_corners=False)
    grad = (grad_q.to(dtype) * slope).sum(others, dtype=acc)
    return torch.where(table.inside, grad, 0).to(table.pos.dtype)


def pool_queries(x: torch.Tensor, positions: Sequence[torch.Tensor], aggregate: str) -> torch.Tensor:
    """Sample ``x`` at the query points and aggregate each cell's ``2**d`` values.

    Args:
        x: Input, shape (N, C, *spatial) with 1, 2 or 3 spatial axes.
        positions: Per spatial axis, its coordinates in pixels, two per output cell, shape (2*n,).
        aggregate: ``"max"`` (the paper's choice) or ``"mean"``.

    Returns:
        Tensor of shape (N, C, n_1, ..., n_d).
    """
    ndim = len(positions)
    tracked = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in positions))
    if aggregate == "max":
        # Query values are computed in x's own dtype: autocast must not re-type them.
        with torch.autocast(x.device.type, enabled=False):
            if tracked:
                return (_MaxQueryPool if ndim == 2 else _MaxQueryPoolNd).apply(x, *positions)
            queries = sample_queries(x, _tables(x, positions))
            return _max_of_blocks(queries) if ndim == 2 else _MAX_POOLS[ndim](queries, 2, 2)
    if not tracked:
        # Inference: the same interpolation pass as max, so a frozen layer's ops match bit for bit.
        return _AVG_POOLS[ndim](sample_queries(x, _tables(x, positions)), 2, 2)
    return _AVG_POOLS[ndim](_separable_queries(x, positions), 2, 2)


def _separable_queries(x: torch.Tensor, positions: Sequence[torch.Tensor]) -> torch.Tensor:
    """All query values through autograd: one differentiable gather-and-lerp per axis."""
    for axis, pos in enumerate(positions):
        x = _differentiable_queries(x, pos, 2 + axis)
    return x


def traceable_pool_queries(x: torch.Tensor, positions: Sequence[torch.Tensor], aggregate: str) -> torch.Tensor:
    """:func:`pool_queries` without value-dependent branches, for torch.compile and torch.export.

    Same values and the same gradient conventions. Inference samples with one
    ``F.interpolate`` pass at the integer size ``2 n``; training samples each axis
    with differentiable gathers so autograd (and the compiler) derives the backward.
    """
    ndim = len(positions)
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and any(p.requires_grad for p in positions):
            queries = _separable_queries(x, positions)
        else:
            size = tuple(p.shape[0] for p in positions)
            queries = F.interpolate(x, size=size, mode=_MODES[ndim], align_corners=False)
        return (_MAX_POOLS if aggregate == "max" else _AVG_POOLS)[ndim](queries, 2, 2)
