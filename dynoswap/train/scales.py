"""Scales that cannot break: the bounds every alpha stays in, and a trust region on each step.

Two rules hold after every optimiser step, whatever the learning rates or lambda:

- **Bounds implied by the model.** Each tie group's alpha stays in ``[low, high]`` per axis. By
  default ``low = 1`` (a DynOPool never outputs more cells than its input has: no upsampling
  unless the model started there or ``max_scale`` allows it) and ``high = n_max / 1`` where
  ``n_max`` is the group's input length with every group at ``low`` (the continuous size never
  falls below one cell, so a squeezed axis stays within reach of the floor's gradient).
  ``min_scale`` / ``max_scale`` replace them.
- **A relative trust region.** One step moves an alpha by at most a factor ``exp(max_step)``
  (default 2%); a non-finite value is undone. The learning rate and lambda then decide the
  direction and the pace up to that limit, never a jump.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import OptionError
from ..layers import DynOPoolNd
from ..validate import MAX_SCALE as LARGEST_SCALE
from .protocol import MAX_STEP

#: Per group (in :func:`leaders` order), its largest input length (h, w) at the current alphas.
InputLengths = Callable[[], list[tuple[int, ...]]]

#: Default upper bound on every scale: a DynOPool does not upsample unless asked to.
MAX_SCALE = 1.0


def leaders(model: nn.Module) -> list[DynOPoolNd]:
    """Return the DynOPools that own an alpha (one per tie group), in module order."""
    found: dict[int, DynOPoolNd] = {}
    for m in model.modules():
        if isinstance(m, DynOPoolNd):
            found.setdefault(id(m.leader), m.leader)
    return list(found.values())


@contextmanager
def alphas_set_to(groups: Sequence[DynOPoolNd], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Give each group's alpha ``values[i]`` for the duration, then restore the old values."""
    saved = [g.alpha.detach().clone() for g in groups]
    try:
        with torch.no_grad():
            for g, v in zip(groups, values, strict=True):
                g.alpha.copy_(v.to(g.alpha.dtype))
        yield
    finally:
        with torch.no_grad():
            for g, v in zip(groups, saved, strict=True):
                g.alpha.copy_(v)


def check_scale_option(name: str, value: float | None) -> None:
    """Refuse a scale bound that is not a finite number in (0, :data:`dynoswap.validate.MAX_SCALE`]."""
    if value is not None and not (
        isinstance(value, (int, float)) and math.isfinite(value) and 0 < value <= LARGEST_SCALE
    ):
        raise OptionError(f"{name} must be a finite number > 0 and at most {LARGEST_SCALE:g}, got {value}")


@dataclass
class ScaleGuard:
    """Bounds and trust region for the alphas of one model.

    Attributes:
        groups: The alpha owners, one per tie group.
        low: Per group, the smallest alpha per axis (largest scale).
        high: Per group, the largest alpha per axis (smallest scale).
        max_step: Largest change of log(alpha) in one step.
    """

    groups: list[DynOPoolNd]
    low: list[torch.Tensor]
    high: list[torch.Tensor]
    max_step: float = MAX_STEP

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        input_lengths: InputLengths,
        min_scale: float | None = None,
        max_scale: float | None = None,
        max_step: float = MAX_STEP,
    ) -> ScaleGuard:
        """Bounds the model implies (see the module docstring), or the ones given.

        Args:
            model: A model with DynOPoolNd layers.
            input_lengths: Each group's input length per axis at the current alphas.
            min_scale: Smallest scale r on every axis (replaces the model-implied high alpha).
            max_scale: Largest scale r on every axis (default :data:`MAX_SCALE`).
            max_step: Trust region per step (log space), > 0.

        Raises:
            OptionError: A bound or step that is not finite and > 0, or ``min_scale > max_scale``.
        """
        check_scale_option("min_scale", min_scale)
        check_scale_option("max_scale", max_scale)
        if min_scale is not None and max_scale is not None and min_scale > max_scale:
            raise OptionError(f"min_scale {min_scale} is larger than max_scale {max_scale}")
        if not (isinstance(max_step, (int, float)) and math.isfinite(max_step) and max_step > 0):
            raise OptionError(f"max_alpha_step must be a finite number > 0, got {max_step}")
        groups = leaders(model)
        current = [g.alpha.detach().clone() for g in groups]
        top = 1.0 / (max_scale if max_scale is not None else MAX_SCALE)
        # Where the model starts above the default bound (an upsampling init), it may stay there.
        low = [torch.clamp(a, max=top) if max_scale is None else torch.full_like(a, top) for a in current]
        if min_scale is not None:
            high = [torch.full_like(a, 1.0 / min_scale) for a in current]
        else:
            with alphas_set_to(groups, low):
                lengths = input_lengths()
            high = [torch.maximum(torch.tensor(lengths[k], dtype=a.dtype), a) for k, a in enumerate(current)]
            high = [torch.maximum(h, lo) for h, lo in zip(high, low, strict=True)]
        return cls(groups, low, high, float(max_step))

    def snapshot(self) -> list[torch.Tensor]:
        """Return the alphas now (to pass to :meth:`step` after the optimiser moved them)."""
        return [g.alpha.detach().clone() for g in self.groups]

    @torch.no_grad()
    def clamp(self) -> None:
        """Put every alpha inside its bounds."""
        for g, lo, hi in zip(self.groups, self.low, self.high, strict=True):
            g.alpha.copy_(torch.maximum(torch.minimum(g.alpha, hi.to(g.alpha.device)), lo.to(g.alpha.device)))

    @torch.no_grad()
    def step(self, before: list[torch.Tensor]) -> None:
        """Undo non-finite values, limit each alpha's move since ``before`` to the trust region, then bound it."""
        factor = math.exp(self.max_step)
        for g, old in zip(self.groups, before, strict=True):
            new = torch.where(torch.isfinite(g.alpha), g.alpha, old)
            g.alpha.copy_(torch.minimum(torch.maximum(new, old / factor), old * factor))
        self.clamp()

    def describe(self) -> list[dict[str, list[float]]]:
        """Per group: the scale bounds (r = 1/alpha), for logs and messages."""
        return [
            {"min_scale": [1.0 / float(v) for v in hi], "max_scale": [1.0 / float(v) for v in lo]}
            for lo, hi in zip(self.low, self.high, strict=True)
        ]


class AlphaStepper:
    """The alphas' update: a normalised gradient step in log space, with momentum.

    With ``u = log(alpha)`` and ``g = dL/du`` over every group's axes, the step is
    ``u -= lr * m / sqrt(v)``, where ``m`` is a running mean of ``g`` and ``v`` a running mean of
    ``mean(g**2)``, one number for all alphas (Adam with a shared second moment). So ``lr`` is the
    typical relative change of an alpha per step, whatever the loss's scale or lambda, and the
    relative sizes of the coordinates (which stage, which axis matters more) are kept. With a cost
    direction (training on a budget) the gradient's component along it is removed first: the step
    moves along the budget, and the projection only corrects the rest.

    Args:
        groups: The alpha owners.
        beta1: Momentum of the gradient mean.
        beta2: Momentum of the second moment.
    """

    def __init__(self, groups: Sequence[DynOPoolNd], beta1: float = 0.9, beta2: float = 0.99) -> None:
        self.groups = list(groups)
        self.beta1, self.beta2 = beta1, beta2
        self.mean: torch.Tensor | None = None
        self.second = 0.0
        self.count = 0

    def _log_grads(self) -> torch.Tensor | None:
        grads = [g.alpha.grad for g in self.groups]
        if all(x is None for x in grads):
            return None
        return torch.cat(
            [
                (x if x is not None else torch.zeros_like(g.alpha)).detach().double().reshape(-1)
                * g.alpha.detach().double().reshape(-1)
                for g, x in zip(self.groups, grads, strict=True)
            ]
        )

    @torch.no_grad()
    def step(self, lr: float, cost_grads: Sequence[torch.Tensor] | None = None) -> None:
        """Move the alphas by their gradients (``.grad``); ``cost_grads``: d(cost)/d(alpha) per group."""
        grad = self._log_grads()
        if grad is None or not bool(torch.isfinite(grad).all()):
            return
        if cost_grads is not None:
            c = torch.cat(
                [x.detach().double().reshape(-1) * g.alpha.detach().double().reshape(-1)
                 for g, x in zip(self.groups, cost_grads, strict=True)]
            )  # fmt: skip
            norm = float(c @ c)
            if norm > 0:
                grad = grad - (grad @ c) / norm * c
        self.count += 1
        previous = torch.zeros_like(grad) if self.mean is None else self.mean
        self.mean = self.beta1 * previous + (1 - self.beta1) * grad
        self.second = self.beta2 * self.second + (1 - self.beta2) * float((grad * grad).mean())
        mean = self.mean / (1 - self.beta1**self.count)
        second = self.second / (1 - self.beta2**self.count)
        if second <= 0:
            return
        move = -lr * mean / (math.sqrt(second) + 1e-12)
        offset = 0
        for g in self.groups:
            n = g.alpha.numel()
            g.alpha.mul_(torch.exp(move[offset : offset + n]).to(g.alpha.dtype).view_as(g.alpha))
            offset += n

    def state_dict(self) -> dict:
        """Return what resuming needs."""
        return {"mean": None if self.mean is None else self.mean.tolist(), "second": self.second, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output."""
        mean = state.get("mean")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float64)
        self.second = float(state.get("second", 0.0))
        self.count = int(state.get("count", 0))
