"""The training loop: task loss + lambda * GMACs loss (eq. 8), SGD with momentum, cosine annealing.

``fit`` works on any model that contains DynOPool2d layers (a converted
GraphModule or a hand-built one) with the caller's own data loaders. It runs
under DDP when a process group is initialised (``torchrun``), keeps the alphas
identical on every rank, checkpoints every epoch and can resume exactly.
"""

from __future__ import annotations

import json
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

from ..layers import DynOPool2d
from . import checkpointing
from .budget import LAND_AT, BudgetController, land_on_budget, relaxed_gmacs, scale_bounds
from .distributed import DistContext, all_reduce_sums, barrier, current_context, pick_device, sync_alphas, wrap_ddp
from .recompute import recompute_view

LOG_FILE = "log.jsonl"

CostFn = Callable[[nn.Module], torch.Tensor]
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


def dynopools(model: nn.Module) -> list[tuple[str, DynOPool2d]]:
    """Named DynOPool2d layers in module order."""
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, DynOPool2d)]


@torch.no_grad()
def probe_pools(model: nn.Module, input_size: tuple[int, int], device: torch.device) -> list[dict[str, Any]]:
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
        inner(torch.zeros(1, _in_channels(inner), *input_size, device=device))
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


def _in_channels(model: nn.Module) -> int:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return 3


def _autocast(device: torch.device, amp: bool):
    if not amp:
        return nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _progress(enabled: bool, console: Any):
    if not enabled or not getattr(console, "is_terminal", False):
        return None  # piped or logged output gets plain lines instead (see _plain_every)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        transient=False,
    )


def _evaluate(model: nn.Module, loader: DataLoader, ctx: DistContext, amp: bool) -> tuple[float, float]:
    model.eval()
    loss_sum = correct = count = 0.0
    with torch.no_grad():
        for images, labels in loader:
            images, labels = images.to(ctx.device, non_blocking=True), labels.to(ctx.device, non_blocking=True)
            with _autocast(ctx.device, amp):
                logits = model(images)
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += float((logits.argmax(1) == labels).sum())
            count += labels.numel()
    model.train()
    loss_sum, correct, count = all_reduce_sums([loss_sum, correct, count], ctx)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _format_sizes(pools: list[dict[str, Any]]) -> str:
    return " ".join(f"{size[0]}x{size[1]}" for _, size in group_sizes(pools) if size)


def _plain_every(enabled: bool, console: Any, steps_per_epoch: int) -> int:
    """Return the steps between plain progress lines (0: none) when the console is not a terminal."""
    if not enabled or console is None or getattr(console, "is_terminal", False):
        return 0
    return max(1, steps_per_epoch // 4)


def _clamp_alphas(model: nn.Module, bounds: tuple[float, float] | None) -> None:
    if bounds is None:
        return
    with torch.no_grad():
        for _, pool in dynopools(model):
            if pool.leader is pool:
                pool.alpha.clamp_(bounds[0], bounds[1])


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
    input_size: tuple[int, int] | None = None,
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
) -> list[dict[str, Any]]:
    """Train ``model`` with the loss of eq. 8: ``task + lam * GMACs loss``.

    SGD with momentum, cosine annealing per step over the whole run, alphas in their
    own parameter group. Under an initialised process group the model is wrapped
    in DDP and rank 0's alphas are broadcast after every step. Only rank 0 prints,
    logs and saves.

    Args:
        model: A model with DynOPool2d layers (e.g. from ``dynoswap.convert``).
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
        compile: ``torch.compile`` the model (recompiles whenever a size changes).
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
        target_gmacs: A GMACs budget: lambda becomes a multiplier adapted every step so that
            the model's GMACs land on it (:mod:`dynoswap.train.budget`); ``lam`` is then its
            starting value.
        min_scale: Lower bound on every DynOPool's scale r (both axes), e.g. 0.1.
        max_scale: Upper bound on every DynOPool's scale r, e.g. 1.0: bounds memory.

    Returns:
        One record per epoch trained in this call (also appended to ``out/log.jsonl``);
        each has ``lambda`` (the last step's) and ``lambda_steps`` (every step's), and the
        first epoch's has ``initial_pools``, the sizes before any step.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if resume and out is None:
        raise ValueError("resume needs the run folder (out=...) that holds the checkpoint")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    ctx = current_context(dev)
    cost_fn = cost_fn or default_cost
    alpha_lr = lr if alpha_lr is None else alpha_lr
    raw = unwrap(model).to(dev)
    if not dynopools(raw):
        raise ValueError("the model has no DynOPool2d layer: convert it first (dynoswap.convert)")
    bounds = scale_bounds(min_scale, max_scale)
    budget = BudgetController(float(target_gmacs)) if target_gmacs is not None else None
    if budget is not None:
        budget.lam = lam
        budget.integral = lam * budget.target

    steps_per_epoch = len(train_loader) if max_steps is None else min(len(train_loader), max_steps)
    total_steps = max(steps_per_epoch * epochs, 1)
    groups = default_param_groups(raw, lr, alpha_lr, weight_decay)
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp and dev.type == "cuda")

    # The first call may record the cost graph (random probe input): do it before RNG states are restored.
    cost_fn(raw)
    start_epoch = step = 0
    if resume:
        folder = checkpointing.find_checkpoint(out)  # type: ignore[arg-type]
        if folder is None:
            raise ValueError(f"--resume: no checkpoint in {out}; run without --resume first")
        state = checkpointing.load_checkpoint(folder, raw)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        checkpointing.set_rng_state(state["rng"])
        if budget is not None and state.get("budget"):
            budget.load_state_dict(state["budget"])

    net = wrap_ddp(recompute_view(raw) if recompute else raw, ctx)
    if compile:
        # Sizes change while alphas train. Automatic dynamic shapes compile each piece static once, then
        # dynamic once, instead of once per size; the cache limit bounds what a backend still guards on.
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)
        net = cast(nn.Module, torch.compile(net))

    main = ctx.is_main
    if main and progress and console is None:
        from rich.console import Console

        console = Console()
    log_path = Path(out) / LOG_FILE if out is not None else None
    if log_path is not None and main:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        if not resume and log_path.exists():
            log_path.unlink()
        elif resume:
            # The log committed with the checkpoint: no epoch lost or repeated by a crash between writes.
            checkpointing.restore_log(folder, out)  # type: ignore[arg-type]
    records: list[dict[str, Any]] = []
    bar = _progress(main and progress, console)
    plain_every = _plain_every(main and progress, console, steps_per_epoch)
    _clamp_alphas(raw, bounds)
    landed: list[torch.Tensor] | None = None  # alphas fixed once the sizes landed on the budget
    initial = probe_pools(raw, input_size, dev) if input_size is not None and start_epoch == 0 else None
    net.train()
    try:
        if bar is not None:
            bar.start()
        for epoch in range(start_epoch, epochs):
            sampler = getattr(train_loader, "sampler", None)
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            task_id = bar.add_task(f"epoch {epoch + 1}/{epochs}", total=steps_per_epoch, stats="") if bar else None
            sums = {"loss": 0.0, "task": 0.0, "gmacs": 0.0, "correct": 0.0, "count": 0.0, "drift": 0.0}
            lambda_steps: list[float] = []
            started = time.perf_counter()
            for i, (images, labels) in enumerate(train_loader):
                if i >= steps_per_epoch:
                    break
                images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
                if input_size is None:
                    input_size = (int(images.shape[-2]), int(images.shape[-1]))
                if initial is None and epoch == 0 and i == 0:
                    initial = probe_pools(raw, input_size, dev)
                if budget is not None and landed is None and step >= LAND_AT * total_steps:
                    land_on_budget(raw, budget.target)
                    landed = [p.alpha.detach().clone() for _, p in dynopools(raw)]
                with _autocast(dev, amp):
                    logits = net(images)
                task = F.cross_entropy(logits.float(), labels)
                cost = cost_fn(raw)
                if landed is not None:
                    lam = 0.0  # sizes are final: the weights train on at them
                elif budget is not None:
                    # Every rank computes the same GMACs (alphas are synced), hence the same lambda.
                    lam = budget.update(relaxed_gmacs(raw, cost), float(scheduler.get_last_lr()[0]) / lr if lr else 1.0)
                loss = task + lam * cost
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {float(loss)} at step {step}; lower --lr or --alpha-lr")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                _clamp_alphas(raw, bounds)
                if landed is not None:
                    with torch.no_grad():
                        for (_, pool), alpha in zip(dynopools(raw), landed, strict=True):
                            pool.alpha.copy_(alpha)
                drift = sync_alphas(raw, ctx)
                step += 1
                n = labels.numel()
                metrics = {
                    "loss": float(loss.detach()),
                    "task": float(task.detach()),
                    "gmacs": float(cost.detach()),
                    "lambda": float(lam),
                }
                lambda_steps.append(float(lam))
                correct = float((logits.detach().argmax(1) == labels).sum())
                for key in ("loss", "task"):
                    sums[key] += metrics[key] * n
                sums["gmacs"] = metrics["gmacs"]
                sums["correct"] += correct
                sums["count"] += n
                sums["drift"] = max(sums["drift"], drift)
                if on_step is not None:
                    on_step(step, metrics)
                stats = f"loss {metrics['loss']:.3f}  train_acc {correct / n:.3f}  GMACs {metrics['gmacs']:.4g}"
                if budget is not None:
                    stats += f"  lambda {lam:.3g}"
                if bar is not None:
                    bar.update(task_id, advance=1, stats=stats)
                elif plain_every and ((i + 1) % plain_every == 0 or i + 1 == steps_per_epoch):
                    console.print(f"  epoch {epoch + 1}/{epochs} step {i + 1}/{steps_per_epoch}  {stats}")
            loss_sum, task_sum, correct, count = all_reduce_sums(
                [sums["loss"], sums["task"], sums["correct"], sums["count"]], ctx
            )
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "loss": loss_sum / max(count, 1),
                "task_loss": task_sum / max(count, 1),
                "gmacs_loss": sums["gmacs"],
                "train_acc": correct / max(count, 1),
                "lr": optimizer.param_groups[0]["lr"],
                "alpha_drift": sums["drift"],
                "seconds": round(time.perf_counter() - started, 3),
                "lambda": float(lam),
                "lambda_steps": lambda_steps,
            }
            if budget is not None:
                record["target_gmacs"] = budget.target
            if epoch == 0 and initial is not None:
                record["initial_pools"] = initial
            if val_loader is not None:
                record["val_loss"], record["val_acc"] = _evaluate(net, val_loader, ctx, amp)
            record["pools"] = probe_pools(raw, input_size or (32, 32), dev)
            record["gmacs"] = float(cost_fn(raw).detach())
            records.append(record)
            if main and out is not None:
                state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "rng": checkpointing.rng_state(),
                }
                if budget is not None:
                    state["budget"] = budget.state_dict()
                checkpointing.save_checkpoint(out, raw, state, log_record=record)
            if main and console is not None:
                console.print(epoch_line(record, epochs))
            barrier(ctx)
            if on_epoch_end is not None:
                on_epoch_end(record)
    finally:
        if bar is not None:
            bar.stop()
    return records


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """Format the line printed after each epoch: every accuracy named, sizes one per tie group in execution order."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"loss {record['loss']:.4f}", f"train_acc {record['train_acc']:.4f}"]
    if "val_acc" in record:
        parts.append(f"val_acc {record['val_acc']:.4f}")
    gmacs = f"GMACs {record['gmacs']:.4g}"
    if "target_gmacs" in record:
        gmacs += f" (target {record['target_gmacs']:.4g}, {record['gmacs'] / record['target_gmacs'] - 1:+.1%})"
        parts.append(f"lambda {record['lambda']:.3g}")
    parts.append(gmacs)
    parts.append(f"sizes {_format_sizes(record['pools'])}")
    return "  ".join(parts)


def read_log(out: str | Path) -> list[dict[str, Any]]:
    """Read the epoch records of a run folder's ``log.jsonl``."""
    path = Path(out)
    path = path / LOG_FILE if path.is_dir() else path
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def mean_log_aspect(pools: list[dict[str, Any]]) -> float:
    """Mean of ``log(r_w / r_h)`` over untied DynOPools: > 0 when maps are wider than tall."""
    values = [math.log(p["scale"][1] / p["scale"][0]) for p in pools if not p.get("tied")]
    return sum(values) / max(len(values), 1)
