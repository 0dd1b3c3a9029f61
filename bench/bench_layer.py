"""DynOPool2d against nn.MaxPool2d(2, 2) and against straightforward formulations of the same layer.

Input [32, 64, 112, 112] float32, r = 0.5 (the exact MaxPool case) and r = 0.47
(the general path: query points between pixels). Contenders, same outputs:

- grid_sample: the paper's equations as written, one (N, 2h, 2w, 2) grid and
  ``F.grid_sample(..., padding_mode="border")``, then a 2x2 max;
- autograd separable: bilinear lerp along rows then columns (advanced indexing,
  autograd through the weights), then a 2x2 max.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.common import Row, median_times
from dynoswap import DynOPool2d
from dynoswap.layers import query_positions, straight_through_size

SHAPE = (32, 64, 112, 112)


def _sizes(x: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = straight_through_size(torch.tensor(x.shape[-2:], dtype=alpha.dtype), alpha)
    return size[0], size[1]


def grid_sample_pool(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Eq. 2 with grid_sample: normalised query points, bilinear, border clamp, then a 2x2 max."""
    size_h, size_w = _sizes(x, alpha)

    def coords(size: torch.Tensor) -> torch.Tensor:
        k = torch.arange(int(size.detach()), dtype=size.dtype)
        centre = -1 + (2 * k + 1) / size
        return torch.stack([centre - 0.5 / size, centre + 0.5 / size], 1).reshape(-1)

    ys, xs = coords(size_h), coords(size_w)
    grid = torch.stack(torch.broadcast_tensors(xs[None, :], ys[:, None]), -1).expand(x.shape[0], -1, -1, -1)
    queries = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.max_pool2d(queries, 2, 2)


def _lerp(x: torch.Tensor, pos: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    clamped = pos.clamp(0, n - 1)
    lo = clamped.detach().floor()
    frac = clamped - lo
    lo = lo.long()
    hi = (lo + 1).clamp_max(n - 1)
    shape = [1] * 4
    shape[dim] = -1
    index = (slice(None),) * dim
    return torch.lerp(x[index + (lo,)], x[index + (hi,)], frac.view(shape))


def separable_pool(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Separable bilinear sampling through autograd, then a 2x2 max."""
    size_h, size_w = _sizes(x, alpha)
    rows = _lerp(x, query_positions(x.shape[-2], size_h), 2)
    return F.max_pool2d(_lerp(rows, query_positions(x.shape[-1], size_w), 3), 2, 2)


class _Functional(nn.Module):
    def __init__(self, fn, scale: float) -> None:
        super().__init__()
        self.fn = fn
        self.alpha = nn.Parameter(torch.tensor([1 / scale, 1 / scale]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.alpha)


def _train_step(module: nn.Module, x: torch.Tensor):
    grad = torch.randn_like(module(x))

    def step() -> None:
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return step


def _inference(module: nn.Module, x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            module(x)

    return step


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, each storage counted once."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


def run() -> list[Row]:
    """Time and memory ratios; targets are the ones set for the layer."""
    torch.manual_seed(0)
    x = torch.randn(SHAPE, requires_grad=True)
    pool = nn.MaxPool2d(2, 2)
    half, general = DynOPool2d(0.5), DynOPool2d(0.47)
    rows: list[Row] = []

    train = median_times(
        {"maxpool": _train_step(pool, x), "half": _train_step(half, x), "general": _train_step(general, x)},
        repeats=7,
        warmup=1,
    )
    infer = median_times(
        {"maxpool": _inference(pool, x), "half": _inference(half, x), "general": _inference(general, x)},
        repeats=7,
        warmup=1,
    )
    base_t, base_i = train["maxpool"], infer["maxpool"]
    rows.append(Row("layer", "MaxPool2d(2,2) fwd+bwd", base_t * 1e3, "ms"))
    rows.append(Row("layer", "MaxPool2d(2,2) fwd no_grad", base_i * 1e3, "ms"))
    for key, label, strict in (("half", "r=0.5", True), ("general", "r=0.47", False)):
        for what, ratio, bound in (
            ("fwd+bwd", train[key] / base_t, 2.0),
            ("fwd no_grad", infer[key] / base_i, 1.5),
        ):
            target = f"<= {bound}" if strict else ""
            rows.append(Row("layer", f"{label} {what} / MaxPool", ratio, "x", target, _ok(ratio <= bound, strict)))

    # The straightforward formulations are slow: fewer repeats, DynOPool2d timed alongside.
    contenders = {
        "maxpool": _train_step(pool, x),
        "dynopool": _train_step(half, x),
        "grid_sample": _train_step(_Functional(grid_sample_pool, 0.5), x),
        "separable": _train_step(_Functional(separable_pool, 0.5), x),
        "dynopool_general": _train_step(general, x),
        "grid_sample_general": _train_step(_Functional(grid_sample_pool, 0.47), x),
    }
    slow = median_times(contenders, repeats=3, warmup=1)
    speedup = slow["grid_sample"] / slow["dynopool"]
    rows.append(Row("layer", "r=0.5 grid_sample / DynOPool2d fwd+bwd", speedup, "x", ">= 4", speedup >= 4))
    rows.append(Row("layer", "r=0.5 grid_sample fwd+bwd / MaxPool", slow["grid_sample"] / slow["maxpool"], "x"))
    separable = slow["separable"] / slow["dynopool"]
    rows.append(Row("layer", "r=0.5 autograd separable / DynOPool2d fwd+bwd", separable, "x"))
    general_speedup = slow["grid_sample_general"] / slow["dynopool_general"]
    rows.append(Row("layer", "r=0.47 grid_sample / DynOPool2d fwd+bwd", general_speedup, "x"))

    base_mem = saved_bytes(pool, x)
    for module, label in ((half, "r=0.5"), (general, "r=0.47")):
        ratio = saved_bytes(module, x) / base_mem
        rows.append(Row("layer", f"{label} saved for backward / MaxPool", ratio, "x", "<= 2.0", ratio <= 2))
    return rows


def _ok(passed: bool, strict: bool) -> bool | None:
    return passed if strict else None
