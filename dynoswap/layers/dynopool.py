"""DynOPool1d, DynOPool2d and DynOPool3d: resizing layers with learnable scale factors (paper section 4.1).

One class, :class:`DynOPoolNd`, holds the equations for any number of spatial axes
(each axis has its own ``alpha = 1 / r``, two query points per cell and the 2-cell
floor); the 1-d, 2-d and 3-d classes only name their axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Self

import torch
from timm.layers import register_notrace_module
from torch import nn

from ..validate import FLOOR_GRADIENTS, POSITION_GRADIENTS
from .resample import pool_queries, traceable_pool_queries
from .sizing import output_size, straight_through_size

AGGREGATES = ("max", "mean")

#: How the scale sequence of each number of axes is named in messages.
_SCALE_NAMES = {1: "an (r_l,) sequence", 2: "an (r_h, r_w) pair", 3: "an (r_t, r_h, r_w) triple"}
#: What one input is called, in messages.
_SAMPLE_NAMES = {1: "signal", 2: "image", 3: "volume"}
#: Memory format a DynOPool keeps when its input has it (and is not also plain contiguous).
_KEPT_FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


def _float32_shortest(value: float) -> float:
    """Return the shortest decimal that reads back as the float32 ``value`` (``0.6000000238...`` → ``0.6``)."""
    import numpy as np

    return float(str(np.float32(value)))


def _scales(init_scale: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    if isinstance(init_scale, (int, float)):
        values = (float(init_scale),) * ndim
    else:
        values = tuple(float(v) for v in init_scale)
        if len(values) != ndim:
            raise ValueError(f"init_scale must be a number or {_SCALE_NAMES[ndim]}, got {init_scale!r}")
    for r in values:
        if not math.isfinite(r) or r <= 0:
            raise ValueError(f"scale factors must be finite and > 0, got {values}")
    return values


def _check_alpha(alpha: Sequence[float], owner: str = "DynOPool2d") -> None:
    if not all(math.isfinite(a) and a > 0 for a in alpha):
        raise ValueError(f"{owner} alpha must be finite and > 0, got {list(alpha)}")


def _check_counts(counts: tuple[int, ...], in_size: tuple[int, ...], owner: str = "DynOPool2d") -> None:
    """Refuse an output that would allocate out of bounds: more than MAX_SCALE times the input per axis."""
    from ..validate import MAX_SCALE

    if any(n > MAX_SCALE * max(side, 1) + 2 for n, side in zip(counts, in_size, strict=True)):
        raise ValueError(
            f"{owner} alpha asks for a {'x'.join(map(str, counts))} output from a "
            f"{'x'.join(map(str, in_size))} input: "
            f"more than {MAX_SCALE:g}x upsampling; alpha must be at least {1 / MAX_SCALE:g}"
        )


def query_positions(
    n_in: int, n_out: torch.Tensor, count: int | None = None, gradient: str = POSITION_GRADIENTS[0]
) -> torch.Tensor:
    """Pixel coordinates of the two query points per output cell along one axis (eq. 2).

    Cell ``k`` of ``n_out`` has centre ``p_k = -1 + (2k+1)/n_out`` in normalised
    coordinates and query points ``p_k +- 1/(2 n_out)``; in pixels
    (``align_corners=False``) that is ``n_in (4k + 2 -+ 1) / (4 n_out) - 1/2``.

    Args:
        n_in: Input length of the axis.
        n_out: Straight-through output length (integer value, continuous gradient).
        count: ``n_out``'s value as an int when the caller already has it (saves a device sync).
        gradient: One of :data:`dynoswap.validate.POSITION_GRADIENTS`: what of the position carries
            ``n_out``'s gradient.
            The values are the same bit for bit either way.

    Returns:
        Tensor of shape (2 * n_out,), ordered cell by cell.
    """
    if count is None:
        count = int(n_out.detach())
    odd = torch.arange(1, 4 * count, 2, dtype=n_out.dtype, device=n_out.device)  # 4k+1, 4k+3
    positions = (n_in * odd) / (4 * n_out) - 0.5
    if gradient == "position" or not n_out.requires_grad:
        return positions
    # The value above, the gradient of +-delta alone (delta = n_in / (4 n_out) pixels): the two
    # query points of a cell spread or close around its fixed centre.
    delta = n_in / (4 * n_out)
    side = torch.tensor((-1.0, 1.0), dtype=n_out.dtype, device=n_out.device).repeat(count)
    return positions.detach() + side * (delta - delta.detach())


class DynOPoolNd(nn.Module):
    """Dynamically optimised pooling over ``ndim`` spatial axes: resize by learnable factors, one per axis.

    The output has ``round(max(n / alpha, 1.5))`` cells per axis. Each cell holds
    two query points per axis (``2**ndim`` in all: 2 in 1-D, the paper's 4 in 2-D,
    8 in 3-D), (multi)linearly interpolated from the input, aggregated by max (or
    mean). The learnable ``alpha = 1/r`` per axis (eq. 6) receives gradient through
    the query positions and, in a cost loss, through the straight-through output
    size (eq. 3-4).

    Several layers of the same dimension can share one ``alpha`` (``tie_to``): they
    then always produce the same resolution from the same input resolution. Only the
    leader owns the parameter, so optimisers and ``state_dict`` see it once.

    Use :class:`DynOPool1d`, :class:`DynOPool2d` or :class:`DynOPool3d`; this base
    class is what code that handles every dimension checks with ``isinstance``.

    Args:
        init_scale: Initial scale factor, a number or one per axis; 0.5 halves each
            axis, values above 1 upsample.
        aggregate: ``"max"`` (the paper's choice) or ``"mean"``.
    """

    #: Number of spatial axes (set by each concrete class).
    ndim: ClassVar[int] = 0
    #: Names of the spatial axes, as in the input's shape.
    axes: ClassVar[tuple[str, ...]] = ()

    #: Gradient of the size below the 2-cell floor (:data:`dynoswap.validate.FLOOR_GRADIENTS`):
    #: a training-time choice, not saved with the model.
    floor_gradient = FLOOR_GRADIENTS[0]
    #: What of the query positions carries the size's gradient (:data:`dynoswap.validate.POSITION_GRADIENTS`):
    #: a training-time choice, not saved with the model.
    position_gradient = POSITION_GRADIENTS[0]

    def __init__(self, init_scale: float | Sequence[float] = 0.5, aggregate: str = "max") -> None:
        super().__init__()
        if not self.ndim:
            raise TypeError("DynOPoolNd is abstract: use DynOPool1d, DynOPool2d or DynOPool3d")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        scales = _scales(init_scale, self.ndim)
        self.aggregate = aggregate
        self.alpha = nn.Parameter(torch.tensor([1.0 / r for r in scales]))
        self.last_in_size: tuple[int, ...] | None = None
        self.last_out_size: tuple[int, ...] | None = None
        self.last_size_st: torch.Tensor | None = None

    # -- tying --------------------------------------------------------------
    def __getattr__(self, name: str):  # noqa: D105 - delegate alpha of a tied follower
        if name == "alpha":
            owner = self.__dict__.get("_alpha_owner")
            if owner is not None:
                return owner.alpha
        return super().__getattr__(name)

    def __getstate__(self) -> dict:
        # The last straight-through size belongs to the autograd graph of the last
        # forward: copies and pickles start without it (deepcopy of a graph tensor fails).
        state = super().__getstate__()
        state["last_size_st"] = None
        return state

    @property
    def leader(self) -> Self:
        """The layer that owns this layer's ``alpha`` (itself when untied)."""
        return self.__dict__.get("_alpha_owner") or self

    def tie_to(self, other: Self) -> None:
        """Share ``other``'s alpha from now on; this layer's own alpha is dropped.

        Raises:
            ValueError: ``other`` resizes another number of axes.
        """
        if other.ndim != self.ndim:
            raise ValueError(
                f"cannot tie a {type(self).__name__} to a {type(other).__name__}: "
                "tied layers must resize the same number of axes"
            )
        leader = other.leader
        if leader is self:
            return
        if "alpha" in self._parameters:
            del self._parameters["alpha"]
        object.__setattr__(self, "_alpha_owner", leader)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D102 - validate on load
        alpha = state_dict.get(prefix + "alpha")
        if isinstance(alpha, torch.Tensor) and alpha.device.type != "meta":
            _check_alpha(alpha.detach().double().tolist(), type(self).__name__)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_floor_gradient(self, mode: str) -> None:
        """Let the size's gradient pass below the 2-cell floor (``"pass"``) or stop there (``"stop"``)."""
        if mode not in FLOOR_GRADIENTS:
            raise ValueError(f"floor_gradient must be one of {FLOOR_GRADIENTS}, got {mode!r}")
        self.floor_gradient = mode

    def set_position_gradient(self, mode: str) -> None:
        """Choose what of the query positions carries the size's gradient (:data:`POSITION_GRADIENTS`).

        ``"displacement"`` moves each query point around its fixed cell centre (paper eq. 5);
        ``"position"`` moves the whole position, centre included.
        """
        if mode not in POSITION_GRADIENTS:
            raise ValueError(f"position_gradient must be one of {POSITION_GRADIENTS}, got {mode!r}")
        self.position_gradient = mode

    # -- scales -------------------------------------------------------------
    @property
    def scale(self) -> tuple[float, ...]:
        """Current scale factors, one per axis: ``1 / alpha``, to alpha's precision.

        The reciprocal is taken in alpha's dtype; a float32 alpha gives each factor as the shortest
        decimal that reads back as the same float32, so ``set_scale((0.6, 0.45))`` reads back
        ``(0.6, 0.45)``, not float32's binary expansion ``0.6000000143...``. A float64 alpha gives
        float64's reciprocal.
        """
        r = self.alpha.detach().reciprocal()
        if r.dtype == torch.float64:
            return tuple(r.tolist())
        return tuple(_float32_shortest(v) for v in r.tolist())

    @torch.no_grad()
    def set_scale(self, scale: float | Sequence[float]) -> None:
        """Set the scale factors (a number or one per axis); tied layers follow since they share alpha."""
        scales = _scales(scale, self.ndim)
        self.alpha.copy_(torch.tensor([1.0 / r for r in scales], dtype=self.alpha.dtype))

    def output_size(self, in_size: tuple[int, ...]) -> tuple[int, ...]:
        """Integer output size for an integer input size, at the current alpha."""
        return output_size(in_size, self.alpha)

    def size_st(self, in_size: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Straight-through output size, one per axis: integer values, gradient to alpha (and ``in_size``)."""
        alpha = self.alpha
        if not isinstance(in_size, torch.Tensor):
            in_size = torch.tensor(in_size, dtype=alpha.dtype, device=alpha.device)
        return straight_through_size(in_size, alpha, self.floor_gradient)

    # -- forward ------------------------------------------------------------
    def forward(self, x: torch.Tensor, in_size_st: torch.Tensor | None = None) -> torch.Tensor:
        """Resize ``x``.

        Args:
            x: Input of shape (N, C, *spatial), ``ndim`` spatial axes.
            in_size_st: Optional straight-through input size (one per axis) from an
                upstream layer, so the recorded ``last_size_st`` chains gradients
                across layers. Its value must equal ``x``'s spatial size.

        Returns:
            Tensor of shape (N, C, *out_spatial).
        """
        name, ndim = type(self).__name__, self.ndim
        if x.dim() != ndim + 2:
            dims = ", ".join(a.upper() for a in self.axes)
            raise ValueError(f"{name} expects a {ndim + 2}D (N, C, {dims}) input, got shape {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and 0 in x.shape[1:]:
            raise ValueError(
                f"{name} needs at least one channel and a non-empty {_SAMPLE_NAMES[ndim]}, got shape {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        alpha = self.alpha
        pos_dtype = torch.promote_types(alpha.dtype, torch.float32)
        given = in_size_st is not None
        if in_size_st is None:
            in_size_st = torch.tensor(spatial, dtype=pos_dtype, device=alpha.device)
        size = straight_through_size(in_size_st.to(pos_dtype), alpha.to(pos_dtype), self.floor_gradient)
        tracing = torch.compiler.is_compiling()
        if tracing:
            # torch.compile / torch.export: the cell counts are symbolic ints, never branched on.
            counts = tuple(size.detach().to(torch.int64).tolist())
            for count in counts:
                torch._check(count >= 2)
        else:
            counts = self._checked_counts(size, in_size_st if given else None, spatial)
        positions = [
            query_positions(n, size[i], counts[i], self.position_gradient).to(x.device) for i, n in enumerate(spatial)
        ]
        out = (traceable_pool_queries if tracing else pool_queries)(x, positions, self.aggregate)
        kept = _KEPT_FORMATS.get(ndim)
        if kept is not None and x.is_contiguous(memory_format=kept) and not x.is_contiguous():
            out = out.contiguous(memory_format=kept)
        if not tracing:  # symbolic sizes must not leak out of a trace into the module
            self.last_in_size = spatial
            self.last_out_size = tuple(out.shape[2:])
            self.last_size_st = size
        return out

    def _checked_counts(
        self, size: torch.Tensor, in_size_st: torch.Tensor | None, in_size: tuple[int, ...]
    ) -> tuple[int, ...]:
        """Integer cell counts, with alpha and ``in_size_st`` checked on the values read in the same sync."""
        ndim, name = self.ndim, type(self).__name__
        parts = [size.detach(), self.alpha.detach().to(size.dtype)]
        if in_size_st is not None:
            parts.append(in_size_st.detach().to(size.dtype).to(size.device))
        values = torch.cat(parts).tolist()
        _check_alpha(values[ndim : 2 * ndim], name)
        counts = tuple(int(v) for v in values[:ndim])
        _check_counts(counts, in_size, name)
        if in_size_st is not None and values[2 * ndim : 3 * ndim] != list(in_size):
            raise ValueError(
                f"in_size_st {values[2 * ndim : 3 * ndim]} does not match the input's spatial size {list(in_size)}: "
                "pass the straight-through size that produced this input (e.g. the upstream layer's last_size_st)"
            )
        return counts

    def extra_repr(self) -> str:
        """Scale factors, aggregate and whether alpha is borrowed from a leader."""
        scales = ", ".join(f"{r:.4g}" for r in self.scale)
        scales = f"({scales},)" if self.ndim == 1 else f"({scales})"
        tied = "" if self.leader is self else ", tied"
        return f"scale={scales}, aggregate={self.aggregate!r}{tied}"


@register_notrace_module  # a leaf for timm's fx feature extraction: its sizes are data-dependent
class DynOPool1d(DynOPoolNd):
    """DynOPool over one axis (N, C, L): a learnable rate ``r_l``, two query points per cell.

    At ``r = 1/2`` on an even length it computes exactly ``MaxPool1d(2)``.
    See :class:`DynOPoolNd` for the arguments.
    """

    ndim = 1
    axes = ("l",)


@register_notrace_module
class DynOPool2d(DynOPoolNd):
    """Dynamically optimised pooling: resize by learnable factors (r_h, r_w).

    The output has ``round(max(n / alpha, 1.5))`` cells per axis. Each cell holds
    four query points, bilinearly interpolated from the input, aggregated by max
    (or mean). The learnable ``alpha = (1/r_h, 1/r_w)`` (eq. 6) receives gradient
    through the query positions and, in a cost loss, through the straight-through
    output size (eq. 3-4).

    Several layers can share one ``alpha`` (``tie_to``): they then always produce
    the same resolution from the same input resolution. Only the leader owns the
    parameter, so optimisers and ``state_dict`` see it once.

    Args:
        init_scale: Initial scale factor, a number or an ``(r_h, r_w)`` pair; 0.5
            halves each axis, values above 1 upsample.
        aggregate: ``"max"`` (the paper's choice) or ``"mean"``.
    """

    ndim = 2
    axes = ("h", "w")

    @property
    def scale(self) -> tuple[float, float]:
        """Current scale factors (r_h, r_w) = 1 / alpha."""
        r_h, r_w = super().scale
        return r_h, r_w


@register_notrace_module
class DynOPool3d(DynOPoolNd):
    """DynOPool over three axes (N, C, T, H, W): learnable ``(r_t, r_h, r_w)``, eight query points per cell.

    For video, ``r_t`` is the share of frames kept. At ``r = 1/2`` on even sizes it
    computes exactly ``MaxPool3d(2)``. See :class:`DynOPoolNd` for the arguments.
    """

    ndim = 3
    axes = ("t", "h", "w")
