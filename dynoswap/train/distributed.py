"""DDP helpers: process group from torchrun's environment, and keeping alphas identical.

DynOPool's alphas decide tensor shapes. DDP averages their gradients, so all
ranks apply the same update, but a rank whose alpha drifts by one ulp could round
a size differently and then deadlock in the next all-reduce. ``sync_alphas``
therefore copies rank 0's alphas to every rank after each optimiser step (a few
floats) and reports how far they had drifted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import OptionError
from ..layers import DynOPoolNd


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """Whether a process group with more than one rank is running."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 prints and saves."""
        return self.rank == 0


def pick_device(device: str | None, local_rank: int = 0) -> torch.device:
    """``None``/``"auto"``: this rank's GPU when CUDA is available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {device!r}: CUDA is not available here; use cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_from_env(device: str | None = None) -> DistContext:
    """Join the process group that torchrun describes (``WORLD_SIZE`` > 1), else run alone.

    The backend is nccl on GPU and gloo on CPU. Calling it again in a process whose
    group is already initialised reuses that group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1 and not dist.is_initialized():
        return DistContext(device=dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def current_context(device: torch.device) -> DistContext:
    """Return the context of an already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), device)
    return DistContext(device=device)


def alpha_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the distinct alpha parameters (tied followers share their leader's), in module order."""
    seen: set[int] = set()
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, DynOPoolNd):
            alpha = module.alpha
            if id(alpha) not in seen:
                seen.add(id(alpha))
                params.append(alpha)
    return params


@torch.no_grad()
def sync_alphas(model: nn.Module, ctx: DistContext) -> float:
    """Copy rank 0's alphas to every rank; return the largest difference found here.

    A non-zero result means floating-point drift that would otherwise have been
    able to give ranks different feature-map sizes.
    """
    params = alpha_parameters(model)
    if not ctx.enabled or not params:
        return 0.0
    local = torch.cat([p.detach().reshape(-1) for p in params])
    reference = local.clone()
    dist.broadcast(reference, src=0)
    drift = float((reference - local).abs().max())
    if drift:
        offset = 0
        for p in params:
            p.copy_(reference[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
    return drift


def all_reduce_sums(values: list[float], ctx: DistContext) -> list[float]:
    """Sum a few metrics (loss sums, counts) over ranks."""
    if not ctx.enabled:
        return values
    backend_device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=backend_device)
    dist.all_reduce(t)
    return t.tolist()


def wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    """Wrap in DistributedDataParallel when distributed, else return ``model`` unchanged.

    ``find_unused_parameters=False``: every parameter, alphas included, gets a
    gradient each step; shapes may change between steps, parameters never do.
    Buffers (BatchNorm statistics) are broadcast from rank 0 before each forward.
    """
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids, find_unused_parameters=False)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op alone)."""
    if ctx.enabled:
        dist.barrier()
