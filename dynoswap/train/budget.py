"""Training to a GMACs budget: lambda as a Lagrange multiplier, adapted every step.

Eq. 8 weights the GMACs loss by a fixed lambda, so the final cost is found only by trial
(the paper's own limitation, supplement section 4). Here the budget is a constraint,
``GMACs(alpha) = G``, and lambda is its multiplier, updated by a proportional-integral
step on the relative error ``e = GMACs / G - 1`` (dual ascent on the integral part, with
a proportional term that damps the oscillation momentum SGD otherwise causes; the
PID-Lagrangian method of Stooke et al., ICML 2020)::

    I_t      = I_{t-1} + k_i * e_t
    lambda_t = (I_t + k_p * e_t) / (G * s_t)  # weight of the GMACs loss, in eq. 8's units

where ``s_t`` is the learning-rate schedule's factor (1 at the start, towards 0 at the end of
cosine annealing): the alphas' step is ``lr_t * lambda_t * dGMACs/dalpha``, so dividing by
``s_t`` keeps the controller's authority while the schedule freezes the task's pull on the
sizes, and the run ends on the budget rather than wherever annealing left it.

The constraint is two-sided (lambda may go negative) because a budget is a target: on data
where the task loss has little say on the sizes, a one-sided ``GMACs <= G`` would leave the
model anywhere below it. Dividing by ``G`` makes the gains independent of the model's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# Gains, measured on digits-stretch (8 epochs, vgg-tiny, targets set to what lambda = 0.3 / GMACs_0 reached):
# (k_i, k_p) = (0.02, 2) steers fast but the sizes swing and val acc trails the fixed-lambda run by 2-7
# points at the same cost; (0.005, 0.5) by 1-3; (0.002, 0.2) by 0-1 (0.908 / 0.911 vs 0.919 / 0.911),
# the landing step putting the last few percent on the budget.
#: Integral gain per step on the relative error.
KI = 0.002
#: Proportional gain on the relative error.
KP = 0.2
#: Smallest learning-rate factor compensated (cosine annealing's last step is at 0).
MIN_LR_FACTOR = 0.02


@dataclass
class BudgetController:
    """Lambda that steers a model's GMACs to ``target``.

    Attributes:
        target: The GMACs budget G (batch 1, as ``count_gmacs`` counts).
        ki: Integral gain (the dual-ascent step on the normalised constraint).
        kp: Proportional gain.
        integral: The accumulated multiplier (normalised by ``target``).
        lam: The current weight of the GMACs loss (eq. 8 units: per GMAC).
    """

    target: float
    ki: float = KI
    kp: float = KP
    integral: float = 0.0
    lam: float = 0.0

    def __post_init__(self) -> None:
        """Check the budget."""
        if not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(f"target GMACs must be finite and > 0, got {self.target}")

    def error(self, gmacs: float) -> float:
        """Relative error ``GMACs / G - 1`` (> 0: over budget)."""
        return gmacs / self.target - 1.0

    def update(self, gmacs: float, lr_factor: float = 1.0) -> float:
        """Take one step with the GMACs of the current sizes; return the new lambda.

        Args:
            gmacs: GMACs of the current sizes.
            lr_factor: The schedule's current learning rate over the initial one.
        """
        err = self.error(gmacs)
        self.integral += self.ki * err
        self.lam = (self.integral + self.kp * err) / (self.target * max(lr_factor, MIN_LR_FACTOR))
        return self.lam

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (resuming continues with the same multiplier)."""
        return {"target": self.target, "ki": self.ki, "kp": self.kp, "integral": self.integral, "lam": self.lam}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        for key in ("target", "ki", "kp", "integral", "lam"):
            if key in state:
                setattr(self, key, float(state[key]))


def relaxed_gmacs(model: Any, cost: Any = None) -> float:
    """GMACs without rounding the sizes: the budget steers the continuous cost, which moves smoothly.

    Steering the rounded cost dithers between neighbouring integer sizes (a pixel of a 2x2 map is
    25% of its stage); the continuous cost converges, and :func:`land_on_budget` deals with the
    rounding. Falls back to ``cost`` (or ``gmacs_loss``) for models without a resolution graph.
    """
    import torch

    from ..cost import gmacs_loss, resolution_graph

    with torch.no_grad():
        try:
            return float(resolution_graph(model).gmacs(relaxed=True))
        except (TypeError, ValueError, RuntimeError, AttributeError):
            return float(cost.detach()) if cost is not None else float(gmacs_loss(model))


def _match_continuous(model: Any, leaders: list[Any], target: float) -> None:
    """Scale every alpha by one common factor so the continuous GMACs equal ``target`` (bisection).

    Keeps the shapes and the split of the budget between stages that training learned; only
    their common scale moves, in case the controller has not converged yet.
    """
    import torch

    saved = [m.alpha.detach().clone() for m in leaders]

    def cost_at(factor: float) -> float:
        with torch.no_grad():
            for m, a in zip(leaders, saved, strict=True):
                m.alpha.copy_(a * factor)
        return relaxed_gmacs(model)

    low, high = 0.25, 4.0  # larger alphas: smaller maps, lower cost
    if not cost_at(high) <= target <= cost_at(low):
        cost_at(1.0)
        return
    for _ in range(40):
        mid = math.sqrt(low * high)
        if cost_at(mid) > target:
            low = mid
        else:
            high = mid
    cost_at(math.sqrt(low * high))


def scale_bounds(min_scale: float | None, max_scale: float | None) -> tuple[float, float] | None:
    """Alpha bounds ``(1 / max_scale, 1 / min_scale)`` for the scale bounds (None: unbounded).

    Raises:
        ValueError: A bound that is not > 0, or ``min_scale > max_scale``.
    """
    if min_scale is None and max_scale is None:
        return None
    for name, value in (("min_scale", min_scale), ("max_scale", max_scale)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    if min_scale is not None and max_scale is not None and min_scale > max_scale:
        raise ValueError(f"min_scale {min_scale} is larger than max_scale {max_scale}")
    low = 1.0 / max_scale if max_scale is not None else 0.0
    high = 1.0 / min_scale if min_scale is not None else math.inf
    return low, high


#: Fraction of the run after which the sizes land on the budget and stay (the weights train on).
LAND_AT = 0.8
#: Most round-down/round-up combinations :func:`land_on_budget` tries (2 per axis per tie group).
MAX_COMBINATIONS = 1024
#: Most single-pixel steps :func:`land_on_budget` takes after the rounding.
MAX_STEPS = 100


def land_on_budget(model: Any, target: float) -> list[tuple[int, int]]:
    """Set integer sizes per tie group whose GMACs are as close to ``target`` as a local search finds.

    The controller steers the continuous cost, whose rounding can still miss a small model's
    budget by a pixel of its smallest map (and sizes never go below 2). First every alpha is
    scaled by one common factor so that the continuous cost is the target (a no-op once the
    controller has converged: the learned shapes and the split between stages stay). Then
    every combination of rounding each axis of each group down or up is tried (up to
    :data:`MAX_COMBINATIONS`; else plain rounding), and from the closest one single-pixel
    steps (any axis, any group) are taken while they bring the cost closer to ``target``.
    The alphas are set to produce the result exactly.

    Args:
        model: A converted model (its alphas are changed in place).
        target: The GMACs budget.

    Returns:
        The chosen size per tie group, in execution order.
    """
    import itertools

    import torch

    from ..cost import alphas, gmacs_loss

    rows = alphas(model)
    leaders: dict[str, Any] = {}
    for row in rows:
        leaders.setdefault(row["group"], model.get_submodule(row["group"]))
    order = list(leaders)
    _match_continuous(model, [leaders[g] for g in order], target)
    first_in: dict[str, list[int]] = {}
    for row in alphas(model):
        first_in.setdefault(row["group"], row["in_size"])
    continuous = [
        [n / float(a) for n, a in zip(first_in[g], leaders[g].alpha.detach().tolist(), strict=True)] for g in order
    ]

    def apply(sizes: tuple[tuple[int, int], ...]) -> float:
        # Group by group in execution order: a group's input size depends on the groups before it.
        with torch.no_grad():
            for g, size in zip(order, sizes, strict=True):
                in_size = next(r["in_size"] for r in alphas(model) if r["group"] == g)
                leaders[g].alpha.copy_(torch.tensor([in_size[0] / size[0], in_size[1] / size[1]]))
            return abs(float(gmacs_loss(model)) / target - 1.0)

    def drift(sizes: tuple[tuple[int, int], ...]) -> float:
        return sum(
            abs(s - c) for size, cont in zip(sizes, continuous, strict=True) for s, c in zip(size, cont, strict=True)
        )

    if 4 ** len(order) <= MAX_COMBINATIONS:
        options = [[sorted({max(math.floor(v), 2), max(math.ceil(v), 2)}) for v in axes] for axes in continuous]
        candidates = [
            tuple((int(h), int(w)) for h, w in choice)
            for choice in itertools.product(*[itertools.product(*axes) for axes in options])
        ]
    else:
        candidates = [tuple((max(round(h), 2), max(round(w), 2)) for h, w in continuous)]
    best = min(candidates, key=lambda sizes: (apply(sizes), drift(sizes)))
    best_miss = apply(best)
    for _ in range(MAX_STEPS):
        steps = []
        for k, (h, w) in enumerate(best):
            for size in ((h - 1, w), (h + 1, w), (h, w - 1), (h, w + 1)):
                if min(size) >= 2:
                    steps.append(best[:k] + (size,) + best[k + 1 :])
        miss, better = min(((apply(c), c) for c in steps), default=(best_miss, best))
        if miss >= best_miss - 1e-12:
            break
        best, best_miss = better, miss
    apply(best)
    return list(best)
