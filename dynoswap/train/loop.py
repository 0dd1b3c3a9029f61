"""The training loop: task loss + lambda * GMACs loss (eq. 8), SGD with momentum, cosine annealing.

``fit`` works on any model that contains DynOPoolNd layers (a converted
GraphModule or a hand-built one) with the caller's own data loaders. It runs
under DDP when a process group is initialised (``torchrun``), keeps the alphas
identical on every rank, checkpoints every epoch and can resume exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..cost.count import infer_in_chans
from ..errors import OptionError, TrainingError
from ..layers import FLOOR_GRADIENTS, POSITION_GRADIENTS, DynOPoolNd
from . import checkpointing
from .budget import check_reachable, check_target, land, project
from .distributed import DistContext, all_reduce_sums, barrier, current_context, pick_device, sync_alphas, wrap_ddp
from .protocol import BUDGET_ANNEAL, MAX_STEP, SEARCH_END, WARMUP
from .recompute import recompute_view
from .scales import AlphaStepper, ScaleGuard, leaders

LOG_FILE = "log.jsonl"

CostFn = Callable[[nn.Module], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EpochHook = Callable[[dict[str, Any]], None]
StepHook = Callable[[int, dict[str, float]], None]


def default_cost(model: nn.Module) -> torch.Tensor:
    """Return the paper's GMACs loss (eq. 7) of ``model``: differentiable in the alphas."""
    from ..cost import gmacs_loss

    return gmacs_loss(model)


def default_param_groups(model: nn.Module, lr: float, alpha_lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Weights with weight decay; alphas in their own group, own learning rate, no weight decay."""
    from ..cost import param_groups

    return param_groups(model, lr=lr, alpha_lr=alpha_lr, weight_decay=weight_decay)


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside a DDP or torch.compile wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def dynopools(model: nn.Module) -> list[tuple[str, DynOPoolNd]]:
    """Named DynOPoolNd layers in module order."""
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, DynOPoolNd)]


@torch.no_grad()
def probe_pools(model: nn.Module, input_size: tuple[int, ...], device: torch.device) -> list[dict[str, Any]]:
    """Alpha, scale and integer in/out size of each DynOPool for one ``input_size`` image, in execution order.

    Runs a single zero image in eval mode (BatchNorm statistics and RNGs are untouched).
    Each row names its tie ``group`` (the layer owning the shared alpha) and, where the
    conversion recorded it, the ``original`` size the replaced resizer produced.
    """
    inner = unwrap(model)
    named = dynopools(inner)
    names = {id(pool): name for name, pool in named}
    order: list[str] = []
    hooks = [pool.register_forward_hook(lambda m, i, o: order.append(names[id(m)])) for _, pool in named]
    was_training = inner.training
    inner.eval()
    try:
        inner(torch.zeros(1, infer_in_chans(inner, ndim=len(input_size)), *input_size, device=device))
    finally:
        inner.train(was_training)
        for hook in hooks:
            hook.remove()
    original = _original_sizes(inner)
    rank = {name: i for i, name in enumerate(dict.fromkeys(order))}
    rows = []
    for name, pool in sorted(named, key=lambda item: rank.get(item[0], len(rank))):
        rows.append(
            {
                "name": name,
                "alpha": [round(v, 6) for v in pool.alpha.detach().tolist()],
                "scale": [round(v, 6) for v in pool.scale],
                "in": list(pool.last_in_size or ()),
                "out": list(pool.last_out_size or ()),
                "tied": pool.leader is not pool,
                "group": names.get(id(pool.leader), name),
                "original": original.get(name),
            }
        )
    return rows


def _original_sizes(model: nn.Module) -> dict[str, list[int]]:
    """DynOPool name -> the size its replaced resizer produced at the conversion's input size."""
    recipe = getattr(model, "meta", {}).get("dynoswap") or {}
    found = {}
    for row in recipe.get("replacements") or []:
        out = row.get("original_out")
        if row.get("dynopool") and out:
            found[str(row["dynopool"])] = [int(v) for v in out]
    return found


def group_sizes(pools: list[dict[str, Any]], key: str = "out") -> list[tuple[str, list[int] | None]]:
    """One (group, size) per tie group, in execution order (the first DynOPool of each group to run)."""
    seen: dict[str, list[int] | None] = {}
    for p in pools:
        group = p.get("group", p["name"])
        if group not in seen:
            seen[group] = p.get(key)
    return list(seen.items())


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _progress(enabled: bool, console: Any):
    if not enabled or not getattr(console, "is_terminal", False):
        return None  # piped or logged output gets plain lines instead (see _plain_every)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        transient=False,
    )


def hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float] | None:
    """Return (correct, counted) of an argmax over dim 1, or ``None`` where labels are not class indices.

    Classification ``(N, C)`` against ``(N,)`` counts images; segmentation ``(N, C, H, W)`` against
    ``(N, H, W)`` counts pixels; any other target (regression, soft labels) has no accuracy.
    """
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or logits.dim() < 2:
        return None
    if labels.shape != logits.shape[:1] + logits.shape[2:]:
        return None
    return float((logits.argmax(1) == labels).sum()), float(labels.numel())


def _evaluate(
    model: nn.Module, loader: DataLoader, ctx: DistContext, amp: bool, loss_fn: LossFn
) -> tuple[float, float | None]:
    """Mean loss per batch element and accuracy (``None`` without class-index labels) over ``loader``."""
    model.eval()
    loss_sum = correct = counted = count = 0.0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            with _autocast(ctx.device, amp):
                logits = model(images)
            loss_sum += float(loss_fn(logits.float(), labels)) * len(images)
            count += len(images)
            found = hits(logits, labels)
            if found is not None:
                correct, counted = correct + found[0], counted + found[1]
    model.train()
    loss_sum, correct, counted, count = all_reduce_sums([loss_sum, correct, counted, count], ctx)
    return loss_sum / max(count, 1), (correct / counted if counted else None)


def _format_sizes(pools: list[dict[str, Any]]) -> str:
    return " ".join("x".join(map(str, size)) for _, size in group_sizes(pools) if size)


def _plain_every(enabled: bool, console: Any, steps_per_epoch: int) -> int:
    """Return the steps between plain progress lines (0: none) when the console is not a terminal."""
    if not enabled or console is None or getattr(console, "is_terminal", False):
        return 0
    return max(1, steps_per_epoch // 4)


#: Training batches kept to choose among roundings on budget by their task loss.
HELD_BATCHES = 2


def check_hyperparameters(**values: float | None) -> None:
    """Refuse NaN, inf and out-of-range hyperparameters before any work (``OptionError``).

    Learning rates, weight decay and lambda must be finite and >= 0; momentum in [0, 1);
    ``warmup``, ``search_end`` and ``budget_anneal`` fractions in [0, 1], warm-up not after the
    search's end.
    """
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise OptionError(f"{name} must be a finite number, got {value!r}")
        if value < 0:
            raise OptionError(f"{name} must be >= 0, got {value}")
        if name == "momentum" and value >= 1:
            raise OptionError(f"momentum must be < 1, got {value}")
        if name in ("warmup", "search_end", "budget_anneal") and value > 1:
            raise OptionError(f"{name} is a fraction of the run: between 0 and 1, got {value}")
    warmup, search_end = values.get("warmup"), values.get("search_end")
    if warmup is not None and search_end is not None and warmup > search_end:
        raise OptionError(f"warmup {warmup} ends after the search does ({search_end})")


def _group_input_sizes(model: nn.Module, input_size: tuple[int, ...], device: torch.device) -> list[tuple[int, ...]]:
    """Per tie group (in :func:`dynoswap.train.scales.leaders` order), its input size: the largest of its layers'."""
    rows = probe_pools(model, input_size, device)
    index = {id(m): k for k, m in enumerate(leaders(unwrap(model)))}
    found: dict[int, tuple[int, ...]] = {}
    for name, pool in dynopools(model):
        row = next(r for r in rows if r["name"] == name)
        k = index[id(pool.leader)]
        size = tuple(int(v) for v in row["in"]) if row["in"] else (0,) * pool.ndim
        old = found.get(k, (0,) * pool.ndim)
        found[k] = tuple(max(a, b) for a, b in zip(old, size, strict=True))
    return [found.get(k, (0,) * m.ndim) for k, m in enumerate(leaders(unwrap(model)))]


def _execution_order(model: nn.Module, input_size: tuple[int, ...], device: torch.device) -> list[int]:
    """Return the indices of the tie groups (leaders order) in the order they first run."""
    inner = unwrap(model)
    index = {id(m): k for k, m in enumerate(leaders(inner))}
    by_name = dict(dynopools(inner))
    order: list[int] = []
    for row in probe_pools(inner, input_size, device):
        k = index[id(by_name[row["name"]].leader)]
        if k not in order:
            order.append(k)
    return order


def _cost_grads(model: nn.Module, cost_fn: CostFn, guard: ScaleGuard) -> list[torch.Tensor]:
    """d(cost)/d(alpha) of every group (the direction a budget's projection moves along)."""
    alphas = [g.alpha for g in guard.groups]
    grads = torch.autograd.grad(cost_fn(model), alphas, allow_unused=True)
    return [g if g is not None else torch.zeros_like(a) for g, a in zip(grads, alphas, strict=True)]


def _weights_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy of every weight and buffer except the DynOPool scales: what a retrain starts from again."""
    scales = {f"{name}.alpha" for name, _ in dynopools(model)}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in scales}


def _restart_weights(
    model: nn.Module, weights: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, steps: int
) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """Put the starting weights back, forget the optimiser's momentum; return a fresh schedule of ``steps``."""
    with torch.no_grad():
        current = model.state_dict()
        for key, value in weights.items():
            current[key].copy_(value)
    optimizer.state.clear()
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"]
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))


def _phase(step: int, total: int, warmup: float, search_end: float) -> str:
    if step < math.floor(warmup * total):
        return "warm-up"
    if step < math.ceil(search_end * total):
        return "search"
    return "fixed"


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader | None = None,
    *,
    epochs: int,
    lam: float = 0.0,
    lr: float = 0.1,
    alpha_lr: float | None = None,
    weight_decay: float = 5e-4,
    momentum: float = 0.9,
    max_steps: int | None = None,
    device: str | torch.device | None = None,
    amp: bool = False,
    compile: bool = False,
    recompute: bool = False,
    input_size: tuple[int, ...] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    cost_fn: CostFn | None = None,
    on_epoch_end: EpochHook | None = None,
    on_step: StepHook | None = None,
    console: Any = None,
    target_gmacs: float | None = None,
    min_scale: float | None = None,
    max_scale: float | None = None,
    max_alpha_step: float = MAX_STEP,
    warmup: float = WARMUP,
    search_end: float = SEARCH_END,
    floor_gradient: str = FLOOR_GRADIENTS[0],
    position_gradient: str = POSITION_GRADIENTS[0],
    cost_unit: str = "GMACs",
    retrain: bool = False,
    loss_fn: LossFn | None = None,
    budget_anneal: float = BUDGET_ANNEAL,
) -> list[dict[str, Any]]:
    """Train ``model`` with the loss of eq. 8: ``task + lam * GMACs loss``.

    SGD with momentum, cosine annealing per step over the whole run, alphas in their
    own parameter group. The run has three phases (fractions of its steps): the alphas are
    held while the weights warm up (``warmup``), learned (the search, until ``search_end``),
    then fixed at integer sizes (landed on the budget, if any) while the weights train on.
    Every alpha stays within its bounds and moves at most ``max_alpha_step`` per step
    (:mod:`dynoswap.train.scales`); with ``target_gmacs`` the alphas are projected onto the
    budget's real cost after every step (:mod:`dynoswap.train.budget`). Under an initialised
    process group the model is wrapped in DDP and rank 0's alphas are broadcast after every step. Only rank 0 prints,
    logs and saves.

    Args:
        model: A model with DynOPoolNd layers (e.g. from ``dynoswap.convert``).
        train_loader: Yields ``(images, labels)``; use a DistributedSampler under DDP.
        val_loader: Optional validation loader, evaluated after every epoch.
        epochs: Number of epochs.
        lam: lambda, the weight of the GMACs loss.
        lr: Learning rate of the weights.
        alpha_lr: Learning rate of the alphas (default: ``lr``).
        weight_decay: Weight decay of the weights (never of the alphas).
        momentum: SGD momentum (the paper: 0.9).
        max_steps: At most this many steps per epoch (quick runs).
        device: ``"cpu"``, ``"cuda"``, ...; default: the GPU if any.
        amp: Mixed precision (fp16 + GradScaler on GPU, bf16 on CPU).
        compile: ``torch.compile`` the model (automatic dynamic shapes: each piece compiles once
            static and once dynamic, not once per size).
        recompute: Keep only the inputs of rule (2)'s high-resolution conv -> norm -> act -> DynOPool
            chains and run them again in backward (:func:`dynoswap.train.recompute.recompute_view`):
            less memory for some extra time; results are unchanged.
        input_size: (H, W) used to report per-DynOPool sizes; default: the first batch's.
        out: Run folder for ``log.jsonl`` and per-epoch checkpoints; ``None`` saves nothing.
        resume: Continue from the checkpoint in ``out`` (exactly: weights, alphas,
            optimiser, scheduler, RNG).
        progress: Show rich progress bars (rank 0 only).
        cost_fn: GMACs loss of a model; default ``dynoswap.gmacs_loss``.
        on_epoch_end: Called on every rank with each epoch's record (after it is checkpointed).
        on_step: Called on every rank with (global step, step metrics).
        console: A rich Console for the epoch lines (default: a new one). Progress bars
            when it is a terminal, plain lines (4 per epoch) otherwise.
        target_gmacs: A budget in ``cost_fn``'s units (GMACs by default): after every step the
            alphas are scaled by one common factor so that the real cost (integer sizes) is on it,
            and the sizes land within 3% of it. A budget the model cannot reach within its
            bounds raises :class:`dynoswap.errors.BudgetError` before any step. ``lam`` still
            adds its cost gradient on top.
        min_scale: Lower bound on every DynOPool's scale r (both axes), e.g. 0.1; default: the
            size never falls below one cell of the group's largest input.
        max_scale: Upper bound on every DynOPool's scale r; default 1 (no upsampling, unless
            a layer starts above it).
        max_alpha_step: Trust region: most an alpha moves in one step, in log space (0.02 = 2%).
        warmup: Fraction of the steps during which the alphas are held.
        search_end: Fraction of the steps after which the sizes land and stay (1: learned to the
            end, then landed).
        budget_anneal: With ``target_gmacs``: fraction of the steps over which the budget moves
            log-linearly from the model's own cost at the start to the target (0: the target from
            the first step; reached by ``search_end`` at the latest). Cells are then taken away (or
            added) gradually while the weights use them, and the real cost is on the target from
            this fraction of the run on.
        floor_gradient: ``"pass"``: the size's gradient passes below the 2-cell floor (paper
            section 5), ``"stop"``: the literal ``max(n / alpha, 1.5)``.
        position_gradient: ``"displacement"``: the size's gradient moves each query point around its
            cell centre (paper eq. 5, the centres stay on the grid); ``"position"``: it moves the whole
            position, centres included (a zoom anchored at the first pixel; the earlier rule).
        cost_unit: What ``cost_fn`` measures, for messages and the epoch line (``"GMACs"``; ``"ms"``
            with :func:`dynoswap.cost.latency.latency_cost`).
        retrain: When the sizes land, put back the weights the run started from (and BatchNorm
            statistics), clear the optimiser's momentum and restart the cosine schedule: the steps
            after ``search_end`` train the learned architecture from its start (phase ``"retrain"``),
            so no weight carries what it adapted to while the sizes moved.
        loss_fn: Task loss ``loss_fn(outputs, targets)`` as a mean (default cross-entropy), e.g. a
            segmentation or regression loss. Accuracy is reported where targets are class indices
            of the outputs' dim 1 (images or pixels), and left out otherwise.

    Returns:
        One record per epoch trained in this call (also appended to ``out/log.jsonl``);
        each has ``gmacs`` (the real cost after the epoch), ``phase`` (the phase its last step
        was in), ``lambda`` (the last step's) and ``lambda_steps`` (every step's), and the
        first epoch's has ``initial_pools``, the sizes before any step.

    Raises:
        OptionError: A NaN, inf or out-of-range hyperparameter, scale bound or budget
            (:class:`dynoswap.errors.BudgetError` for a budget out of reach).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise OptionError(f"epochs must be an integer >= 1, got {epochs!r}")
    check_hyperparameters(
        lr=lr, alpha_lr=alpha_lr, lam=lam, weight_decay=weight_decay, momentum=momentum,
        warmup=warmup, search_end=search_end, budget_anneal=budget_anneal,
    )  # fmt: skip
    if floor_gradient not in FLOOR_GRADIENTS:
        raise OptionError(f"floor_gradient must be one of {FLOOR_GRADIENTS}, got {floor_gradient!r}")
    if position_gradient not in POSITION_GRADIENTS:
        raise OptionError(f"position_gradient must be one of {POSITION_GRADIENTS}, got {position_gradient!r}")
    target = check_target(target_gmacs) if target_gmacs is not None else None
    if resume and out is None:
        raise OptionError("resume needs the run folder (out=...) that holds the checkpoint")
    task_loss = loss_fn or F.cross_entropy
    dev = device if isinstance(device, torch.device) else pick_device(device)
    ctx = current_context(dev)
    cost_fn = cost_fn or default_cost
    alpha_lr = lr if alpha_lr is None else alpha_lr
    raw = unwrap(model).to(dev)
    if not dynopools(raw):
        raise TrainingError("the model has no DynOPool layer: convert it first (dynoswap.convert)")
    for _, pool in dynopools(raw):
        pool.set_floor_gradient(floor_gradient)
        pool.set_position_gradient(position_gradient)

    def real_cost() -> float:
        with torch.no_grad():
            return float(cost_fn(raw).detach())

    guard: ScaleGuard | None = None

    def make_guard(size: tuple[int, ...]) -> ScaleGuard:
        made = ScaleGuard.for_model(
            raw, lambda: _group_input_sizes(raw, size, dev), min_scale, max_scale, max_alpha_step
        )
        if target is not None:
            check_reachable(target, made, real_cost, cost_unit)
        return made

    if input_size is not None:
        guard = make_guard(input_size)  # refuse bad bounds or an unreachable budget before any work

    steps_per_epoch = len(train_loader) if max_steps is None else min(len(train_loader), max_steps)
    total_steps = max(steps_per_epoch * epochs, 1)
    # The weights take SGD; the alphas their own normalised step (dynoswap.train.scales.AlphaStepper).
    groups = [g for g in default_param_groups(raw, lr, alpha_lr, weight_decay) if g["name"] != "alphas"]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    stepper = AlphaStepper(leaders(raw))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp and dev.type == "cuda")

    # The first call may record the cost graph (random probe input): do it before RNG states are restored.
    cost_fn(raw)
    start_epoch = step = 0
    saved_start: dict[str, torch.Tensor] | None = None
    # The model's own cost when the run started: where an annealed budget starts (kept across a resume).
    budget_start: float | None = None
    if resume:
        folder = checkpointing.find_checkpoint(out)  # type: ignore[arg-type]
        if folder is None:
            raise TrainingError(f"no checkpoint in {out} to resume from; start the run without resume first")
        state = checkpointing.load_checkpoint(folder, raw)
        optimizer.load_state_dict(state["optimizer"])
        stepper.load_state_dict(state.get("alpha_stepper") or {})
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        checkpointing.set_rng_state(state["rng"])
        saved_start = state.get("starting_weights")
        budget_start = state.get("budget_start")
        if budget_start is not None and not (
            isinstance(budget_start, float) and math.isfinite(budget_start) and budget_start > 0
        ):
            raise TrainingError(f"the checkpoint in {out} holds a budget start of {budget_start!r}: start over")

    start_step_of_call = step
    land_step = math.ceil(search_end * total_steps)
    landed = step >= land_step
    starting_weights = None
    if retrain and not landed:
        starting_weights = saved_start if resume else _weights_snapshot(raw)
        if starting_weights is None:
            raise TrainingError(f"the checkpoint in {out} was written without retrain: resume it without retrain")
    net = wrap_ddp(recompute_view(raw) if recompute else raw, ctx)
    if compile:
        # Sizes change while alphas train. Automatic dynamic shapes compile each piece static once, then
        # dynamic once, instead of once per size; the cache limit bounds what a backend still guards on.
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        net = cast(nn.Module, torch.compile(net))

    main = ctx.is_main
    if main and progress and console is None:
        from ..display import make_console

        console = make_console()  # a pipe gets no width limit: an epoch line is never broken
    log_path = Path(out) / LOG_FILE if out is not None else None
    if log_path is not None and main:
        checkpointing.claim_run_folder(Path(out))  # type: ignore[arg-type]  # locked, and provably a dynoswap run
        if not resume and log_path.exists():
            log_path.unlink()
        elif resume:
            # The log committed with the checkpoint: no epoch lost or repeated by a crash between writes.
            checkpointing.restore_log(folder, out)  # type: ignore[arg-type]
    records: list[dict[str, Any]] = []
    bar = _progress(main and progress, console)
    plain_every = _plain_every(main and progress, console, steps_per_epoch)
    initial = probe_pools(raw, input_size, dev) if input_size is not None and start_epoch == 0 else None
    held: list[tuple[torch.Tensor, torch.Tensor]] = []  # the latest training batches, to score roundings
    lam_now = 0.0 if target is not None and lam == 0 else float(lam)

    # Reached by the landing at the latest: the sizes land on the target itself.
    anneal_steps = math.ceil(min(budget_anneal, search_end) * total_steps) if target is not None else 0

    def budget_now() -> float | None:
        if target is None or budget_start is None or step >= anneal_steps:
            return target
        t = step / anneal_steps
        return budget_start ** (1 - t) * target**t

    def on_budget() -> None:
        nonlocal budget_start
        assert guard is not None
        if target is not None and not landed:
            if anneal_steps and budget_start is None and step == 0:
                budget_start = real_cost()
            project(guard, cast(float, budget_now()), real_cost)
        sync_alphas(raw, ctx)

    def land_now() -> list[tuple[int, ...]]:
        assert guard is not None and input_size is not None
        size = input_size

        def score() -> float:
            was = raw.training
            raw.eval()
            try:
                with torch.no_grad(), _autocast(dev, amp):
                    return sum(float(task_loss(raw(x).float(), y)) for x, y in held) / max(len(held), 1)
            finally:
                raw.train(was)

        sizes = land(
            guard,
            lambda: _group_input_sizes(raw, size, dev),
            _execution_order(raw, size, dev),
            real_cost,
            target,
            score if held else None,
        )
        sync_alphas(raw, ctx)
        return sizes

    net.train()
    try:
        if bar is not None:
            bar.start()
        for epoch in range(start_epoch, epochs):
            sampler = getattr(train_loader, "sampler", None)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            task_id = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=steps_per_epoch, stats="") if bar else None
            sums = {"loss": 0.0, "task": 0.0, "gmacs": 0.0, "correct": 0.0, "counted": 0.0, "count": 0.0}
            sums["drift"] = 0.0
            lambda_steps: list[float] = []
            started = time.perf_counter()
            for i, (images, labels) in enumerate(train_loader):
                if i >= steps_per_epoch:
                    break
                images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
                if input_size is None:
                    input_size = tuple(int(v) for v in images.shape[2:])
                if initial is None and epoch == 0 and i == 0:
                    initial = probe_pools(raw, input_size, dev)
                if guard is None:
                    guard = make_guard(input_size)
                if step == start_step_of_call:
                    on_budget()  # the starting design on the budget (a common scale: the shape is kept)
                phase = ("retrain" if retrain else "fixed") if landed else _phase(step, total_steps, warmup, search_end)
                learn = phase == "search"
                with _autocast(dev, amp):
                    logits = net(images)
                task = task_loss(logits.float(), labels)
                cost = cost_fn(raw)
                lam = lam_now if learn else 0.0
                loss = task + lam * cost if lam else task
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"loss became {float(loss)} at step {step}; lower the learning rate of the weights"
                    )
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                before = guard.snapshot()
                if learn:
                    factor = float(scheduler.get_last_lr()[0]) / lr if lr else 1.0
                    stepper.step(alpha_lr * factor, _cost_grads(raw, cost_fn, guard) if target is not None else None)
                    guard.step(before)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                drift = sync_alphas(raw, ctx)
                if learn:
                    on_budget()
                held[:] = (held + [(images.detach(), labels.detach())])[-HELD_BATCHES:]
                step += 1
                if not landed and step >= land_step:
                    land_now()  # the search is over: integer sizes, on the budget, from now on
                    landed = True
                    if retrain:
                        assert starting_weights is not None
                        scheduler = _restart_weights(raw, starting_weights, optimizer, total_steps - step)
                        starting_weights = None
                n = len(images)
                metrics = {
                    "loss": float(loss.detach()),
                    "task": float(task.detach()),
                    "gmacs": float(cost.detach()),
                    "lambda": float(lam),
                }
                lambda_steps.append(float(lam))
                found = hits(logits.detach(), labels)
                for key in ("loss", "task"):
                    sums[key] += metrics[key] * n
                sums["gmacs"] = metrics["gmacs"]
                if found is not None:
                    sums["correct"] += found[0]
                    sums["counted"] += found[1]
                sums["count"] += n
                sums["drift"] = max(sums["drift"], drift)
                if on_step is not None:
                    on_step(step, metrics)
                acc = f"  train_acc {found[0] / found[1]:.3f}" if found is not None and found[1] else ""
                stats = f"loss {metrics['loss']:.3f}{acc}  {cost_unit} {metrics['gmacs']:.4g}"
                if bar is not None:
                    bar.update(task_id, advance=1, stats=stats)
                elif plain_every and ((i + 1) % plain_every == 0 or i + 1 == steps_per_epoch):
                    console.print(
                        f"  epoch {epoch + 1}/{epochs} step {i + 1}/{steps_per_epoch}  {stats}", soft_wrap=True
                    )
            loss_sum, task_sum, correct, counted, count = all_reduce_sums(
                [sums["loss"], sums["task"], sums["correct"], sums["counted"], sums["count"]], ctx
            )
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "loss": loss_sum / max(count, 1),
                "task_loss": task_sum / max(count, 1),
                "gmacs_loss": sums["gmacs"],
                "lr": optimizer.param_groups[0]["lr"],
                "alpha_drift": sums["drift"],
                "seconds": round(time.perf_counter() - started, 3),
                "lambda": float(lam),
                "lambda_steps": lambda_steps,
                "phase": phase,  # of the epoch's last step
            }
            record["cost_unit"] = cost_unit
            if counted:
                record["train_acc"] = correct / counted
            if target is not None:
                record["target_gmacs"] = target
                record["budget"] = budget_now()  # the annealed budget the epoch ended on
            if epoch == 0 and initial is not None:
                record["initial_pools"] = initial
            if val_loader is not None:
                record["val_loss"], val_acc = _evaluate(net, val_loader, ctx, amp, task_loss)
                if val_acc is not None:
                    record["val_acc"] = val_acc
            record["pools"] = probe_pools(raw, input_size or (32, 32), dev)
            record["gmacs"] = float(cost_fn(raw).detach())
            records.append(record)
            if main and out is not None:
                state = {
                    "optimizer": optimizer.state_dict(),
                    "alpha_stepper": stepper.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "rng": checkpointing.rng_state(),
                }
                if starting_weights is not None:
                    state["starting_weights"] = starting_weights  # until the landing restarts from them
                if budget_start is not None:
                    state["budget_start"] = budget_start
                checkpointing.save_checkpoint(out, raw, state, log_record=record)
            if main and console is not None:
                console.print(epoch_line(record, epochs), soft_wrap=True)  # one record, one line
            barrier(ctx)
            if on_epoch_end is not None:
                on_epoch_end(record)
    finally:
        if bar is not None:
            bar.stop()
    return records


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """Format the line printed after each epoch: every accuracy named, sizes one per tie group in execution order."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']:.4f}"]
    if "train_acc" in record:
        parts.append(f"train_acc {record['train_acc']:.4f}")
    if "val_acc" in record:
        parts.append(f"val_acc {record['val_acc']:.4f}")
    gmacs = f"{record.get('cost_unit', 'GMACs')} {record['gmacs']:.4g}"
    if "target_gmacs" in record:
        gmacs += f" (target {record['target_gmacs']:.4g}, {record['gmacs'] / record['target_gmacs'] - 1:+.1%})"
    parts.append(gmacs)
    parts.append(f"sizes {_format_sizes(record['pools'])}")
    return "  ".join(parts)


def read_log(out: str | Path) -> list[dict[str, Any]]:
    """Read the epoch records of a run folder's ``log.jsonl``."""
    path = Path(out)
    path = path / LOG_FILE if path.is_dir() else path
    return checkpointing.read_log_file(path)


def mean_log_aspect(pools: list[dict[str, Any]]) -> float:
    """Mean of ``log(r_w / r_h)`` over untied 2-D DynOPools: > 0 when maps are wider than tall."""
    values = [math.log(p["scale"][-1] / p["scale"][-2]) for p in pools if not p.get("tied") and len(p["scale"]) == 2]
    return sum(values) / max(len(values), 1)
