"""DynOPool2d: a resizing layer with learnable scale factors (paper section 4.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from timm.layers import register_notrace_module
from torch import nn

from .resample import pool_queries, traceable_pool_queries
from .sizing import FLOOR_GRADIENTS, output_size, straight_through_size

AGGREGATES = ("max", "mean")


def _float32_shortest(value: float) -> float:
    """Return the shortest decimal that reads back as the float32 ``value`` (``0.6000000238...`` → ``0.6``)."""
    import numpy as np

    return float(str(np.float32(value)))


def _pair_of_scales(init_scale: float | Sequence[float]) -> tuple[float, float]:
    if isinstance(init_scale, (int, float)):
        pair = (float(init_scale), float(init_scale))
    else:
        values = tuple(float(v) for v in init_scale)
        if len(values) != 2:
            raise ValueError(f"init_scale must be a number or an (r_h, r_w) pair, got {init_scale!r}")
        pair = (values[0], values[1])
    for r in pair:
        if not math.isfinite(r) or r <= 0:
            raise ValueError(f"scale factors must be finite and > 0, got {pair}")
    return pair


def _check_alpha(alpha: Sequence[float]) -> None:
    if not all(math.isfinite(a) and a > 0 for a in alpha):
        raise ValueError(f"DynOPool2d alpha must be finite and > 0, got {list(alpha)}")


def _check_counts(counts: tuple[int, int], in_size: tuple[int, int]) -> None:
    """Refuse an output that would allocate out of bounds: more than MAX_SCALE times the input per axis."""
    from ..validate import MAX_SCALE

    if any(n > MAX_SCALE * max(side, 1) + 2 for n, side in zip(counts, in_size, strict=True)):
        raise ValueError(
            f"DynOPool2d alpha asks for a {counts[0]}x{counts[1]} output from a {in_size[0]}x{in_size[1]} input: "
            f"more than {MAX_SCALE:g}x upsampling; alpha must be at least {1 / MAX_SCALE:g}"
        )


def query_positions(n_in: int, n_out: torch.Tensor, count: int | None = None) -> torch.Tensor:
    """Pixel coordinates of the two query points per output cell along one axis (eq. 2).

    Cell ``k`` of ``n_out`` has centre ``p_k = -1 + (2k+1)/n_out`` in normalised
    coordinates and query points ``p_k +- 1/(2 n_out)``; in pixels
    (``align_corners=False``) that is ``n_in (4k + 2 -+ 1) / (4 n_out) - 1/2``.

    Args:
        n_in: Input length of the axis.
        n_out: Straight-through output length (integer value, continuous gradient).
        count: ``n_out``'s value as an int when the caller already has it (saves a device sync).

    Returns:
        Tensor of shape (2 * n_out,), ordered cell by cell.
    """
    if count is None:
        count = int(n_out.detach())
    odd = torch.arange(1, 4 * count, 2, dtype=n_out.dtype, device=n_out.device)  # 4k+1, 4k+3
    return (n_in * odd) / (4 * n_out) - 0.5


@register_notrace_module  # a leaf for timm's fx feature extraction: its sizes are data-dependent
class DynOPool2d(nn.Module):
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

    #: Gradient of the size below the 2-cell floor (:data:`dynoswap.layers.sizing.FLOOR_GRADIENTS`):
    #: a training-time choice, not saved with the model.
    floor_gradient = "pass"

    def __init__(self, init_scale: float | Sequence[float] = 0.5, aggregate: str = "max") -> None:
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        r_h, r_w = _pair_of_scales(init_scale)
        self.aggregate = aggregate
        self.alpha = nn.Parameter(torch.tensor([1.0 / r_h, 1.0 / r_w]))
        self.last_in_size: tuple[int, int] | None = None
        self.last_out_size: tuple[int, int] | None = None
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
    def leader(self) -> DynOPool2d:
        """The layer that owns this layer's ``alpha`` (itself when untied)."""
        return self.__dict__.get("_alpha_owner") or self

    def tie_to(self, other: DynOPool2d) -> None:
        """Share ``other``'s alpha from now on; this layer's own alpha is dropped."""
        leader = other.leader
        if leader is self:
            return
        if "alpha" in self._parameters:
            del self._parameters["alpha"]
        object.__setattr__(self, "_alpha_owner", leader)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: D102 - validate on load
        alpha = state_dict.get(prefix + "alpha")
        if isinstance(alpha, torch.Tensor) and alpha.device.type != "meta":
            _check_alpha(alpha.detach().double().tolist())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def set_floor_gradient(self, mode: str) -> None:
        """Let the size's gradient pass below the 2-cell floor (``"pass"``) or stop there (``"stop"``)."""
        if mode not in FLOOR_GRADIENTS:
            raise ValueError(f"floor_gradient must be one of {FLOOR_GRADIENTS}, got {mode!r}")
        self.floor_gradient = mode

    # -- scales -------------------------------------------------------------
    @property
    def scale(self) -> tuple[float, float]:
        """Current scale factors (r_h, r_w) = 1 / alpha, to alpha's precision.

        The reciprocal is taken in alpha's dtype; a float32 alpha gives each factor as the shortest
        decimal that reads back as the same float32, so ``set_scale((0.6, 0.45))`` reads back
        ``(0.6, 0.45)``, not float32's binary expansion ``0.6000000143...``. A float64 alpha gives
        float64's reciprocal.
        """
        r = self.alpha.detach().reciprocal()
        if r.dtype == torch.float64:
            r_h, r_w = r.tolist()
            return r_h, r_w
        return _float32_shortest(float(r[0])), _float32_shortest(float(r[1]))

    @torch.no_grad()
    def set_scale(self, scale: float | Sequence[float]) -> None:
        """Set (r_h, r_w); tied layers follow since they share alpha."""
        r_h, r_w = _pair_of_scales(scale)
        self.alpha.copy_(torch.tensor([1.0 / r_h, 1.0 / r_w], dtype=self.alpha.dtype))

    def output_size(self, in_size: tuple[int, int]) -> tuple[int, int]:
        """Integer output size for an integer input size, at the current alpha."""
        return output_size(in_size, self.alpha)

    def size_st(self, in_size: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Straight-through output size (h, w): integer values, gradient to alpha (and ``in_size``)."""
        alpha = self.alpha
        if not isinstance(in_size, torch.Tensor):
            in_size = torch.tensor(in_size, dtype=alpha.dtype, device=alpha.device)
        return straight_through_size(in_size, alpha, self.floor_gradient)

    # -- forward ------------------------------------------------------------
    def forward(self, x: torch.Tensor, in_size_st: torch.Tensor | None = None) -> torch.Tensor:
        """Resize ``x``.

        Args:
            x: Input of shape (N, C, H, W).
            in_size_st: Optional straight-through input size (h, w) from an
                upstream layer, so the recorded ``last_size_st`` chains gradients
                across layers. Its value must equal ``x``'s spatial size.

        Returns:
            Tensor of shape (N, C, H_out, W_out).
        """
        if x.dim() != 4:
            raise ValueError(f"DynOPool2d expects a 4D (N, C, H, W) input, got shape {tuple(x.shape)}")
        if not torch.compiler.is_compiling() and (x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0):
            raise ValueError(f"DynOPool2d needs at least one channel and a non-empty image, got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        alpha = self.alpha
        pos_dtype = torch.promote_types(alpha.dtype, torch.float32)
        given = in_size_st is not None
        if in_size_st is None:
            in_size_st = torch.tensor((h, w), dtype=pos_dtype, device=alpha.device)
        size = straight_through_size(in_size_st.to(pos_dtype), alpha.to(pos_dtype), self.floor_gradient)
        tracing = torch.compiler.is_compiling()
        if tracing:
            # torch.compile / torch.export: the cell counts are symbolic ints, never branched on.
            n_h, n_w = size.detach().to(torch.int64).tolist()
            torch._check(n_h >= 2)
            torch._check(n_w >= 2)
        else:
            n_h, n_w = self._checked_counts(size, in_size_st if given else None, (h, w))
        pos_h = query_positions(h, size[0], n_h).to(x.device)
        pos_w = query_positions(w, size[1], n_w).to(x.device)
        out = (traceable_pool_queries if tracing else pool_queries)(x, pos_h, pos_w, self.aggregate)
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)
        if not tracing:  # symbolic sizes must not leak out of a trace into the module
            self.last_in_size = (h, w)
            self.last_out_size = tuple(out.shape[-2:])  # type: ignore[assignment]
            self.last_size_st = size
        return out

    def _checked_counts(
        self, size: torch.Tensor, in_size_st: torch.Tensor | None, in_size: tuple[int, int]
    ) -> tuple[int, int]:
        """Integer cell counts, with alpha and ``in_size_st`` checked on the values read in the same sync."""
        parts = [size.detach(), self.alpha.detach().to(size.dtype)]
        if in_size_st is not None:
            parts.append(in_size_st.detach().to(size.dtype).to(size.device))
        values = torch.cat(parts).tolist()
        _check_alpha(values[2:4])
        _check_counts((int(values[0]), int(values[1])), in_size)
        if in_size_st is not None and values[4:6] != list(in_size):
            raise ValueError(
                f"in_size_st {values[4:6]} does not match the input's spatial size {list(in_size)}: "
                "pass the straight-through size that produced this input (e.g. the upstream layer's last_size_st)"
            )
        return int(values[0]), int(values[1])

    def extra_repr(self) -> str:
        """Scale factors, aggregate and whether alpha is borrowed from a leader."""
        r_h, r_w = self.scale
        tied = "" if self.leader is self else ", tied"
        return f"scale=({r_h:.4g}, {r_w:.4g}), aggregate={self.aggregate!r}{tied}"
