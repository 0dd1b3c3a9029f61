"""Training to a cost budget on the cost the model really has, and landing on integer sizes.

A budget ``G`` (``--target-gmacs``) is a constraint, ``cost(alpha) = G``, where ``cost`` is the
real cost: the integer sizes the forward pass uses, exactly what ``count_gmacs`` reports.
After every optimiser step the alphas are projected back onto it: every group's alpha is
multiplied by one common factor ``s`` (bounds respected), and ``s`` is found by bisection on
the real cost, a step function of ``s``, taking the side of the step nearest to ``G``. The task
gradient decides the *shape* (how the budget is split between stages and axes); the projection
keeps its total on the budget at every step, so there is no multiplier to wind up or
oscillate, and a log entry's cost is always the one the model has.

Before training, :func:`budget_range` gives the cheapest cost the model can reach (every group
at its largest alpha, fixed parts included) and the largest (every group at its smallest);
a budget outside that range is refused (:class:`dynoswap.errors.BudgetError`).

Landing (:func:`land`) fixes the sizes once the search phase ends. It considers, per group and
axis, the integer sizes on either side of the learned continuous size; among the combinations
whose real cost is within the tolerance of ``G`` it keeps the one with the lowest task loss on
held training batches (up to :data:`MAX_SCORED` of them, nearest the learned sizes first). The
weights then train on at those sizes for the rest of the schedule.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch

from ..errors import BudgetError
from ..layers import cells
from .scales import ScaleGuard, alphas_set_to

#: A budget is met when the real cost is within this relative distance of it.
TOLERANCE = 0.03
#: Most rounding combinations :func:`land` enumerates (2 per axis per tie group).
MAX_COMBINATIONS = 4096
#: Most candidate roundings whose task loss :func:`land` evaluates.
MAX_SCORED = 8
#: Most single-pixel steps :func:`land` takes when no rounding is within the tolerance.
MAX_STEPS = 100

Cost = Callable[[], float]


def check_target(target: float) -> float:
    """Refuse a budget that is not a finite number > 0 (``BudgetError``)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not (math.isfinite(target) and target > 0):
        raise BudgetError(f"the target cost must be a finite number > 0, got {target}")
    return float(target)


def budget_range(guard: ScaleGuard, cost: Cost) -> tuple[float, float]:
    """Return the cheapest and the largest real cost within the guard's bounds (every group at one end)."""
    with alphas_set_to(guard.groups, guard.high):
        cheapest = cost()
    with alphas_set_to(guard.groups, guard.low):
        largest = cost()
    return cheapest, largest


def check_reachable(target: float, guard: ScaleGuard, cost: Cost, unit: str = "GMACs") -> tuple[float, float]:
    """Refuse a budget outside :func:`budget_range` with the range and what would make it reachable.

    Raises:
        BudgetError: The budget is below the cheapest or above the largest reachable cost.
    """
    cheapest, largest = budget_range(guard, cost)
    if target < cheapest * (1 - TOLERANCE):
        raise BudgetError(
            f"a budget of {target:.4g} {unit} is out of reach: the cheapest this converted model can be is "
            f"{cheapest:.4g} {unit} (every map at its floor; reachable range {cheapest:.4g} to {largest:.4g}). "
            "Give a larger budget, convert with placement 'pre' (strided convs then run after their "
            "DynOPool), or train at a smaller input size"
        )
    if target > largest * (1 + TOLERANCE):
        raise BudgetError(
            f"a budget of {target:.4g} {unit} is out of reach: the largest this model can be within its scale "
            f"bounds is {largest:.4g} {unit} (reachable range {cheapest:.4g} to {largest:.4g}). Give a smaller "
            "budget, or allow upsampling with a larger max scale"
        )
    return cheapest, largest


def _miss(value: float, target: float) -> float:
    return abs(value / target - 1.0)


@torch.no_grad()
def project(guard: ScaleGuard, target: float, cost: Cost, iterations: int = 40) -> float:
    """Scale every group's alpha by one common factor (bounds kept) so the real cost is nearest ``target``.

    Returns:
        The real cost after the projection.
    """
    base = guard.snapshot()
    span = max(float(torch.log(hi / lo).max()) for lo, hi in zip(guard.low, guard.high, strict=True)) + 1e-6

    def cost_at(t: float) -> float:
        factor = math.exp(t)
        for g, a in zip(guard.groups, base, strict=True):
            g.alpha.copy_(a * factor)
        guard.clamp()
        return cost()

    lo, hi = -span, span  # cost_at(lo) is the largest cost, cost_at(hi) the cheapest
    here = cost_at(0.0)
    if here >= target:
        lo, lo_cost = 0.0, here
        hi_cost = cost_at(hi)
    else:
        hi, hi_cost = 0.0, here
        lo_cost = cost_at(lo)
    if lo_cost < target or hi_cost > target:  # out of range: the nearer end
        best = lo if lo_cost < target else hi
        return cost_at(best)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        value = cost_at(mid)
        if value >= target:
            lo, lo_cost = mid, value
        else:
            hi, hi_cost = mid, value
    return cost_at(lo if _miss(lo_cost, target) <= _miss(hi_cost, target) else hi)


def _set_sizes(
    guard: ScaleGuard, order: Sequence[int], sizes: Sequence[tuple[int, ...]], in_sizes: Callable[[], list]
) -> None:
    """Give group ``order[k]`` the alpha that makes its output exactly ``sizes[k]``, group by group.

    A group's input size depends on the groups before it, so each is read after the previous is set.
    """
    for k, size in zip(order, sizes, strict=True):
        n_in = in_sizes()[k]
        g = guard.groups[k]
        exact = torch.tensor([n / s for n, s in zip(n_in, size, strict=True)], dtype=g.alpha.dtype)
        # An upstream choice can move this group's input: its bounds win over the exact size.
        g.alpha.copy_(torch.maximum(torch.minimum(exact, guard.high[k].to(exact)), guard.low[k].to(exact)))


def _sizes_now(guard: ScaleGuard, order: Sequence[int], in_sizes: Callable[[], list]) -> list[tuple[int, ...]]:
    """Each group's output size (one value per axis) at the current alphas, in ``order``."""
    inputs = in_sizes()
    out = []
    for k in order:
        alpha = guard.groups[k].alpha
        out.append(tuple(cells(int(n), float(a), alpha.dtype) for n, a in zip(inputs[k], alpha.tolist(), strict=True)))
    return out


@torch.no_grad()
def land(
    guard: ScaleGuard,
    in_sizes: Callable[[], list[tuple[int, ...]]],
    order: Sequence[int],
    cost: Cost,
    target: float | None,
    score: Callable[[], float] | None = None,
) -> list[tuple[int, ...]]:
    """Fix integer sizes per tie group; return them in execution order.

    Args:
        guard: The alphas and their bounds.
        in_sizes: Per group (guard order), its input size (one value per axis) at the current alphas.
        order: Group indices in execution order.
        cost: The real cost at the current alphas.
        target: The budget, or None (keep the nearest rounding of the learned sizes).
        score: Task loss at the current alphas (lower is better), to choose among roundings on budget.
    """
    sizes_in = in_sizes()
    continuous = [
        [n / float(a) for n, a in zip(sizes_in[k], guard.groups[k].alpha.tolist(), strict=True)] for k in order
    ]
    # Sizes whose alpha stays within the guard's bounds (at the inputs the learned state gives).
    allowed = [
        [
            (math.ceil(n / float(hi) - 1e-9), math.floor(n / float(lo) + 1e-9))
            for n, lo, hi in zip(sizes_in[k], guard.low[k].tolist(), guard.high[k].tolist(), strict=True)
        ]
        for k in order
    ]

    def near(value: float, bounds: tuple[int, ...]) -> int:
        return max(min(round(value), bounds[1]), bounds[0], 2)

    def within(size: int, bounds: tuple[int, ...]) -> bool:
        return size >= 2 and bounds[0] <= size <= bounds[1]

    nearest = tuple(
        tuple(near(v, b) for v, b in zip(axes, bs, strict=True)) for axes, bs in zip(continuous, allowed, strict=True)
    )

    def apply(sizes: tuple[tuple[int, ...], ...]) -> float:
        _set_sizes(guard, order, sizes, in_sizes)
        return cost()

    if target is None:
        apply(nearest)
        return _sizes_now(guard, order, in_sizes)

    def drift(sizes: tuple[tuple[int, ...], ...]) -> float:
        return sum(
            abs(s - c) for size, cont in zip(sizes, continuous, strict=True) for s, c in zip(size, cont, strict=True)
        )

    if 2 ** sum(len(axes) for axes in continuous) <= MAX_COMBINATIONS:
        options = [
            [
                sorted({c for c in (math.floor(v), math.ceil(v)) if within(c, b)} or {near(v, b)})
                for v, b in zip(axes, bs, strict=True)
            ]
            for axes, bs in zip(continuous, allowed, strict=True)
        ]
        candidates = [
            tuple(tuple(int(v) for v in size) for size in choice)
            for choice in itertools.product(*[itertools.product(*axes) for axes in options])
        ]
    else:
        candidates = [nearest]
    costs = {c: apply(c) for c in candidates}
    on_budget = sorted((c for c in candidates if _miss(costs[c], target) <= TOLERANCE), key=drift)[:MAX_SCORED]
    if on_budget:
        if score is None or len(on_budget) == 1:
            best = on_budget[0]
        else:
            scores = {}
            for c in on_budget:
                apply(c)
                scores[c] = score()
            best = min(on_budget, key=lambda c: (scores[c], drift(c)))
        apply(best)
        return _sizes_now(guard, order, in_sizes)
    # No rounding is on budget (a coarse map: one pixel of a 2x2 is a quarter of its stage): walk pixel by pixel.
    best = min(candidates, key=lambda c: (_miss(costs[c], target), drift(c)))
    best_miss = _miss(costs[best], target)
    for _ in range(MAX_STEPS):
        steps = []
        for k, current in enumerate(best):
            for axis, delta in itertools.product(range(len(current)), (-1, 1)):
                size = tuple(v + delta if i == axis else v for i, v in enumerate(current))
                if all(within(v, b) for v, b in zip(size, allowed[k], strict=True)):
                    steps.append(best[:k] + (size,) + best[k + 1 :])
        miss, better = min(((_miss(apply(c), target), c) for c in steps), default=(best_miss, best))
        if miss >= best_miss - 1e-12:
            break
        best, best_miss = better, miss
    apply(best)
    return _sizes_now(guard, order, in_sizes)
