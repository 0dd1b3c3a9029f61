"""``dynoswap train MODEL --data DATA``: learn the DynOPool scales with task + lambda * GMACs loss.

Runs alone or under ``torchrun --nproc_per_node N -m dynoswap train ...`` (DDP:
nccl on GPU, gloo on CPU; only rank 0 prints and saves).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..train.data import DATA_HANDLERS, PATH_KINDS
from ..train.protocol import ALPHA_LR, BUDGET_ANNEAL, MAX_STEP, SEARCH_END, WARMUP
from ..validate import FLOOR_GRADIENTS, POSITION_GRADIENTS
from .common import (
    INPUT_SIZE_METAVAR,
    DebugOption,
    ModelKwargsOption,
    TrustCodeOption,
    UsageError,
    handle_errors,
    parse_kwargs,
)
from .profile import load_table
from .render import safe

if TYPE_CHECKING:
    from torch import nn

    from ..presets import Preset
    from ..train.distributed import DistContext


@dataclass
class Hyper:
    """Training hyperparameters after merging the preset with the flags (flags win)."""

    epochs: int
    batch_size: int
    lr: float
    alpha_lr: float
    weight_decay: float
    momentum: float
    lam: float
    amp: bool


#: What one sample of a data set is called, by its number of spatial axes (2: images).
SAMPLES = {1: "signals", 3: "clips"}

#: Defaults without a preset: short CPU-friendly runs of the built-in sets.
DEFAULTS = Hyper(
    epochs=10, batch_size=64, lr=0.05, alpha_lr=ALPHA_LR, weight_decay=5e-4, momentum=0.9, lam=0.0, amp=False
)


def merge_hyper(preset: Preset | None, flags: dict[str, Any]) -> Hyper:
    """Preset values (supplement Tables 1-2) where given, flags over them, else ``DEFAULTS``."""
    values = dict(vars(DEFAULTS))
    if preset is not None:
        t = preset.train
        if t.optimizer != "sgd" or t.scheduler != "cosine":
            raise UsageError(f"preset {preset.name}: train supports SGD with cosine annealing only")
        values.update(
            epochs=t.epochs,
            batch_size=t.batch_size,
            lr=t.lr,
            alpha_lr=t.alpha_lr,
            weight_decay=t.weight_decay,
            momentum=t.momentum,
            lam=t.gmacs_lambda,
            amp=t.amp,
        )
    values.update({k: v for k, v in flags.items() if v is not None})
    hyper = Hyper(**values)
    for key in ("epochs", "batch_size"):
        if getattr(hyper, key) < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(hyper, key)}")
    for key in ("lr", "alpha_lr", "weight_decay", "lam", "momentum"):
        value = getattr(hyper, key)
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"--{key.replace('_', '-')} must be a finite number >= 0, got {value}")
    if hyper.momentum >= 1:
        raise UsageError(f"momentum must be < 1, got {hyper.momentum}")
    return hyper


def check_training_flags(
    target_gmacs: float | None,
    min_scale: float | None,
    max_scale: float | None,
    max_alpha_step: float,
    warmup: float,
    search_end: float,
    budget_anneal: float,
) -> None:
    """Refuse NaN, inf and out-of-range training flags before any import or work (one line, exit 2)."""
    for flag, value in (("--target-gmacs", target_gmacs), ("--min-scale", min_scale), ("--max-scale", max_scale)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"{flag} must be a finite number > 0, got {value}")
    if min_scale is not None and max_scale is not None and min_scale > max_scale:
        raise UsageError(f"--min-scale {min_scale} is larger than --max-scale {max_scale}")
    if not (math.isfinite(max_alpha_step) and max_alpha_step > 0):
        raise UsageError(f"--max-alpha-step must be a finite number > 0, got {max_alpha_step}")
    for flag, value in (("--warmup", warmup), ("--search-end", search_end), ("--budget-anneal", budget_anneal)):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise UsageError(f"{flag} is a fraction of the run's steps: between 0 and 1, got {value}")
    if warmup > search_end:
        raise UsageError(
            f"--warmup {warmup} ends after --search-end {search_end}: give a warm-up before the search end"
        )


def build_model(
    spec: str,
    num_classes: int,
    input_size: tuple[int, ...],
    preset: Preset | None,
    model_kwargs: list[str] | None,
    placement: str | None,
    init_scale: float | None,
    trust_code: bool = False,
    pretrained: bool = False,
) -> nn.Module:
    """Build a converted model ready to train: a saved dynoswap model continues, a name is converted first.

    With ``pretrained`` the model starts from its library's pretrained weights (torchvision's
    weights enums, timm's ``pretrained=True``; the paper's networks take their torchvision twin's).
    """
    from .common import err_console, load_model
    from .convert import make_plan, run_conversion

    if _is_saved(spec):
        if model_kwargs or placement or init_scale is not None or pretrained:
            raise UsageError(
                f"{spec} is already converted: --model-kwargs/--placement/--init-scale/--pretrained do not apply"
            )
        return load_model(spec, trust_code=trust_code).model
    kwargs = parse_kwargs(model_kwargs)
    loaded = load_model(spec, num_classes, kwargs, trust_code=trust_code)
    if pretrained:
        from ..pretrained import apply_pretrained

        report = apply_pretrained(loaded.model, loaded.source)
        kept = f"; kept their own values: {', '.join(report.kept)}" if report.kept else ""
        err_console().print(f"pretrained: {report.loaded} tensors from {report.source}{kept}")
    plan = make_plan(preset, input_size, num_classes, placement, init_scale, None, None)
    gm, _ = run_conversion(loaded.model, plan, loaded.source)
    return gm


def _is_saved(spec: str) -> bool:
    from ..io.run import is_run_folder
    from ..models import is_saved_model

    return is_saved_model(spec) or is_run_folder(spec)


def next_steps(run_dir: Path) -> list[str]:
    """Where a finished run's model is and the commands that use it (the run folder stands for its model)."""
    import shlex

    from ..io.run import CHECKPOINT_DIR, MODEL_DIR, WEIGHTS_FILE

    checkpoint = run_dir / CHECKPOINT_DIR
    if not (checkpoint / MODEL_DIR).is_dir():
        return [f"weights: {safe(checkpoint / WEIGHTS_FILE)} (a state dict: the model has no recorded source)"]
    run = shlex.quote(str(run_dir))
    return [
        f"model: {safe(checkpoint / MODEL_DIR)} (the final epoch's)",
        f"next: dynoswap export {safe(run)} -o {safe(shlex.quote(run_dir.name + '.onnx'))}",
        f"(dynoswap inspect {safe(run)} and dynoswap.load({safe(repr(str(run_dir)))}) take the run folder too)",
    ]


def check_channels(model: nn.Module, spec: str, data: Any) -> int:
    """Refuse, before training, a model whose input channels differ from the data's; returns the channels."""
    from ..cost.count import infer_in_chans

    sample = data.train[0][0]
    channels = int(sample.shape[0])
    wanted = infer_in_chans(model, ndim=sample.dim() - 1)
    if wanted != channels:
        raise UsageError(
            f"{spec} takes {wanted}-channel images but {data.name} has {channels}-channel images; build the model "
            f"for {channels} channels (timm: --model-kwargs in_chans={channels}) or use {wanted}-channel data"
        )
    return channels


def _check_saved_model(
    model: nn.Module, spec: str, input_size: tuple[int, ...], num_classes: int, channels: int = 3
) -> None:
    import torch

    with torch.no_grad():
        was = model.training
        model.eval()
        out = model(torch.zeros(1, channels, *input_size))
        model.train(was)
    if out.shape[-1] != num_classes:
        raise UsageError(f"{spec} has {out.shape[-1]} outputs but the data has {num_classes} classes")


def check_cost_flags(
    cost: str, latency_table: Path | None, target_gmacs: float | None, target_latency: float | None
) -> tuple[float | None, str]:
    """Check --cost, --latency-table and the targets together; return the target and the cost's unit."""
    if cost not in ("gmacs", "latency"):
        raise UsageError(f"--cost must be gmacs or latency, got {cost!r}")
    if target_latency is not None and not (math.isfinite(target_latency) and target_latency > 0):
        raise UsageError(f"--target-latency must be a finite number > 0, got {target_latency}")
    if target_latency is not None:
        cost = "latency"
    if cost == "latency":
        if latency_table is None:
            raise UsageError("--cost latency needs --latency-table T.json (make one with `dynoswap profile`)")
        if target_gmacs is not None:
            raise UsageError("--target-gmacs is a GMACs budget: with --cost latency give --target-latency MS")
        return target_latency, "ms"
    if latency_table is not None:
        raise UsageError("--latency-table is used with --cost latency (or --target-latency)")
    return target_gmacs, "GMACs"


def _announce(
    ctx: DistContext,
    console: Any,
    model_spec: str,
    data: Any,
    hyper: Hyper,
    out: Path,
    target: float | None,
    unit: str = "GMACs",
) -> None:
    if not ctx.is_main:
        return
    world = f", {ctx.world_size} processes" if ctx.enabled else ""
    if target is not None:
        cost = f"target {target:g} {unit} (real cost, projected every step)"
    else:
        cost = f"lambda {hyper.lam:g}"
    console.print(
        f"training {model_spec} on {data.name} ({len(data.train)} {SAMPLES.get(len(data.input_size), 'images')}, "
        f"{data.num_classes} classes, "
        f"{'x'.join(map(str, data.input_size))}) on {ctx.device}{world}: {hyper.epochs} epochs, "
        f"batch {hyper.batch_size}, lr {hyper.lr:g}, alpha lr {hyper.alpha_lr:g}, {cost} -> {safe(out)}",
        soft_wrap=True,  # one record, one line, whatever the width
    )


@handle_errors
def train_cmd(
    model: str = typer.Argument(
        ...,
        help="Model name (resnet18, tv:NAME, timm:NAME, pkg.module:factory, vgg-tiny, paper:...) or a saved model dir.",
    ),
    data: str = typer.Option(
        ...,
        "--data",
        metavar="DATA",
        help=f"Built in: {', '.join(k for k in DATA_HANDLERS if k not in PATH_KINDS)}. "
        f"Local files: {', '.join(f'{k}:PATH' for k in PATH_KINDS)}.",
    ),
    preset: str | None = typer.Option(None, "--preset", help="Named preset (conversion + hyperparameters)."),
    epochs: int | None = typer.Option(None, "--epochs", help=f"Epochs (default {DEFAULTS.epochs} or the preset's)."),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help=f"Batch size per process (default {DEFAULTS.batch_size} or the preset's)."
    ),
    lr: float | None = typer.Option(
        None, "--lr", help=f"Learning rate of the weights (default {DEFAULTS.lr:g} or the preset's)."
    ),
    alpha_lr: float | None = typer.Option(
        None,
        "--alpha-lr",
        help=f"Typical relative change of an alpha per step (normalised step; default {DEFAULTS.alpha_lr:g}).",
    ),
    weight_decay: float | None = typer.Option(
        None,
        "--weight-decay",
        help=f"Weight decay, never on alphas (default {DEFAULTS.weight_decay:g} or the preset's).",
    ),
    lam: float | None = typer.Option(
        None,
        "--lam",
        help=(
            f"lambda: weight of the GMACs loss (eq. 8), per GMAC, default {DEFAULTS.lam:g}. The presets use "
            "the paper's "
            "1e-7 to 2.2e-4 (supplement Table 2, e.g. 2.2e-4 for VGG-16 CIFAR-100 DynOPool-S). For a cost "
            "rather than a weight use --target-gmacs."
        ),
    ),
    target_gmacs: float | None = typer.Option(
        None,
        "--target-gmacs",
        metavar="G",
        help=(
            "Train to a budget of G GMACs on the model's real cost: after every step the scales are projected "
            "onto it, and the final model lands within 3% of G. A budget the model cannot reach is refused "
            "before training, with the reachable range."
        ),
    ),
    cost: str = typer.Option(
        "gmacs",
        "--cost",
        help="What lambda and the budget weigh: gmacs (fvcore, the paper's loss) or latency (needs --latency-table).",
    ),
    latency_table: Path | None = typer.Option(
        None, "--latency-table", metavar="T.json", help="Latency table from `dynoswap profile` (for --cost latency)."
    ),
    target_latency: float | None = typer.Option(
        None,
        "--target-latency",
        metavar="MS",
        help="Train to a latency budget in ms (predicted by --latency-table), like --target-gmacs.",
    ),
    min_scale: float | None = typer.Option(
        None, "--min-scale", metavar="R", help="Lower bound on every scale r (default: at least one cell)."
    ),
    max_scale: float | None = typer.Option(
        None, "--max-scale", metavar="R", help="Upper bound on every scale r (default 1: no upsampling)."
    ),
    max_alpha_step: float = typer.Option(
        MAX_STEP, "--max-alpha-step", metavar="F", help="Most an alpha moves in one step, relative (0.02 = 2%)."
    ),
    warmup: float = typer.Option(WARMUP, "--warmup", metavar="F", help="Fraction of the steps with the scales held."),
    search_end: float = typer.Option(
        SEARCH_END,
        "--search-end",
        metavar="F",
        help="Fraction of the steps after which the sizes land and stay fixed (1: learn to the end).",
    ),
    budget_anneal: float = typer.Option(
        BUDGET_ANNEAL,
        "--budget-anneal",
        metavar="F",
        help=(
            "With a budget: fraction of the steps over which it moves from the model's own cost to the target "
            "(0: the target from the first step; reached by --search-end at the latest)."
        ),
    ),
    retrain: bool = typer.Option(
        False,
        "--retrain",
        help=(
            "When the sizes land (--search-end), restart the weights from where the run began and train the "
            "learned architecture for the remaining steps, with a fresh cosine schedule."
        ),
    ),
    floor_gradient: str = typer.Option(
        FLOOR_GRADIENTS[0],
        "--floor-gradient",
        help="pass: gradients reach sizes below the 2-cell floor (paper section 5); stop: the literal max(., 1.5).",
    ),
    position_gradient: str = typer.Option(
        POSITION_GRADIENTS[0],
        "--position-gradient",
        help=(
            "displacement: a size's gradient moves each query point around its fixed cell centre (paper eq. 5); "
            "position: it moves the whole position, centres included (the earlier rule)."
        ),
    ),
    pretrained: bool = typer.Option(
        False, "--pretrained", help="Start from torchvision's or timm's pretrained weights (their own cache)."
    ),
    amp: bool | None = typer.Option(None, "--amp/--no-amp", help="Mixed precision."),
    seed: int = typer.Option(0, "--seed", help="Seed of weights, data order and synthetic data."),
    workers: int = typer.Option(0, "--workers", min=0, metavar="N", help="DataLoader worker processes (N >= 0)."),
    device: str | None = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: GPU if any)."),
    input_size: str | None = typer.Option(
        None,
        "--input-size",
        metavar=INPUT_SIZE_METAVAR,
        help="Input height and width; 1 number for 1-D data, 3 for video (default: the data set's own size).",
    ),
    model_kwargs: list[str] | None = ModelKwargsOption,
    placement: str | None = typer.Option(None, "--placement", help="post or pre (conversion rule)."),
    init_scale: float | None = typer.Option(None, "--init-scale", metavar="R", help="Initial scale of every DynOPool."),
    out: Path | None = typer.Option(None, "--out", help="Run folder: log.jsonl and checkpoint/ (default runs/...)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --out."),
    force: bool = typer.Option(False, "--force", help="Start over in an existing run folder (its log and checkpoint)."),
    trust_code: bool = TrustCodeOption,
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png", help="Plot sizes, accuracy and GMACs."),
    max_steps: int | None = typer.Option(
        None, "--max-steps", min=1, metavar="N", help="At most N steps per epoch (N >= 1)."
    ),
    compile: bool = typer.Option(
        False,
        "--compile",
        help=(
            "torch.compile (inductor) with automatic dynamic shapes: each piece compiles once static, once "
            "dynamic, not once per size, up to 64 recompiles; on CPU inductor still recompiles convolutions "
            "on new sizes."
        ),
    ),
    recompute: bool = typer.Option(
        False,
        "--recompute",
        help="Recompute the high-resolution segments of strided convs in backward: less memory, some more time.",
    ),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Progress bars on a terminal, plain lines when piped."
    ),
    debug: bool = DebugOption,
) -> None:
    """Train a model's DynOPool scales and weights with the paper's loss: task + lambda * GMACs.

    lambda is a weight per GMAC, so its useful scale depends on the model (the paper's presets use
    1e-7 to 2.2e-4). To get a model of a given cost instead, give --target-gmacs G: lambda then
    adapts every step and the final GMACs land within 3% of G.
    """
    from ..io.figures import check_plot_path
    from ..io.run import check_new_run
    from ..train.data import check_data_spec
    from .common import check_file, err_console, out_console, parse_input_size
    from .convert import _load_preset

    # Every argument that needs no torch is checked before the slow imports.
    check_training_flags(target_gmacs, min_scale, max_scale, max_alpha_step, warmup, search_end, budget_anneal)
    target, cost_unit = check_cost_flags(cost, latency_table, target_gmacs, target_latency)
    check_file(latency_table, "--latency-table")
    for flag, value, rules in (
        ("--floor-gradient", floor_gradient, FLOOR_GRADIENTS),
        ("--position-gradient", position_gradient, POSITION_GRADIENTS),
    ):
        if value not in rules:
            raise UsageError(f"{flag} must be {' or '.join(rules)}, got {value!r}")
    check_data_spec(data)
    size = parse_input_size(input_size) if input_size else None
    preset_obj = _load_preset(preset, None, trust_code)
    hyper = merge_hyper(
        preset_obj,
        {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "alpha_lr": alpha_lr,
            "weight_decay": weight_decay,
            "lam": lam,
            "amp": amp,
        },
    )
    run_dir = out or Path("runs") / f"{Path(model).name.replace(':', '_')}-{data.split(':')[0]}"
    if resume and force:
        raise UsageError("give either --resume (continue the run) or --force (start it over), not both")
    if not resume and _is_saved(model) and Path(model).resolve() == run_dir.resolve():
        raise UsageError(f"{model} is the model to train and the run folder: give another --out for the new run")
    if plot is not None:
        check_plot_path(plot, force)  # before any work: a .png name, not someone else's file
    if not resume and os.environ.get("RANK", "0") == "0":
        check_new_run(run_dir, force)  # checked again under the run's lock below, by the process that writes it
    import torch

    from ..train.checkpointing import prepare_run_folder
    from ..train.data import load_data, make_loaders
    from ..train.distributed import init_from_env
    from ..train.loop import fit, read_log

    table = load_table(latency_table)
    if not resume and os.environ.get("RANK", "0") == "0":
        prepare_run_folder(run_dir, force)  # before any slow work; only the process that writes the run
    ctx = init_from_env(device)
    try:
        torch.manual_seed(seed)
        # New sizes appear while alphas train; benchmark mode would re-tune for each of them.
        torch.backends.cudnn.benchmark = False
        bundle = load_data(data, size, seed)
        net = build_model(
            model,
            bundle.num_classes,
            bundle.input_size,
            preset_obj,
            model_kwargs,
            placement,
            init_scale,
            trust_code,
            pretrained,
        )
        channels = check_channels(net, model, bundle)
        if _is_saved(model):
            _check_saved_model(net, model, bundle.input_size, bundle.num_classes, channels)
        train_loader, val_loader = make_loaders(
            bundle,
            hyper.batch_size,
            workers=workers,
            rank=ctx.rank,
            world_size=ctx.world_size,
            seed=seed,
            pin_memory=ctx.device.type == "cuda",
        )
        console = out_console() if ctx.is_main else None
        _announce(ctx, console or err_console(), model, bundle, hyper, run_dir, target, cost_unit)
        cost_fn = None
        if table is not None:
            from ..cost.latency import latency_cost

            cost_fn = functools.partial(latency_cost, table=table)
        fit(
            net,
            train_loader,
            val_loader,
            epochs=hyper.epochs,
            lam=hyper.lam,
            lr=hyper.lr,
            alpha_lr=hyper.alpha_lr,
            weight_decay=hyper.weight_decay,
            momentum=hyper.momentum,
            max_steps=max_steps,
            device=ctx.device,
            amp=hyper.amp,
            compile=compile,
            recompute=recompute,
            input_size=bundle.input_size,
            out=run_dir,
            resume=resume,
            progress=progress and ctx.is_main,
            console=console,
            target_gmacs=target,
            cost_fn=cost_fn,
            cost_unit=cost_unit,
            min_scale=min_scale,
            max_scale=max_scale,
            max_alpha_step=max_alpha_step,
            warmup=warmup,
            search_end=search_end,
            budget_anneal=budget_anneal,
            floor_gradient=floor_gradient,
            position_gradient=position_gradient,
            retrain=retrain,
        )
        if ctx.is_main:
            if plot is not None:
                from ..train.plot import plot_history

                plot_history(read_log(run_dir), plot, title=f"{model} on {bundle.name}", force=force)
                console.print(f"plot: {safe(plot)}", soft_wrap=True)  # type: ignore[union-attr]
            if target is not None:
                if table is not None:
                    from ..cost.latency import predict_latency

                    final = predict_latency(net, table, bundle.input_size)
                else:
                    from ..cost import count_gmacs

                    final = count_gmacs(net, bundle.input_size).total
                console.print(  # type: ignore[union-attr]
                    f"final {cost_unit} {final:.4g}, target {target:g} ({final / target - 1:+.1%})", soft_wrap=True
                )
            console.print(  # type: ignore[union-attr]
                f"log: {safe(run_dir / 'log.jsonl')}  checkpoint: {safe(run_dir / 'checkpoint')}", soft_wrap=True
            )
            for line in next_steps(run_dir):
                console.print(line, soft_wrap=True)  # type: ignore[union-attr]  # a path is never broken
    finally:
        if ctx.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


def register(app: typer.Typer) -> None:
    """Add the ``train`` command."""
    app.command("train", no_args_is_help=True)(train_cmd)
