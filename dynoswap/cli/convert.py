"""``dynoswap convert MODEL``: replace a model's resizers by DynOPools, report and optionally save."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ..validate import MAX_SCALE
from .common import (
    DEFAULT_INPUT_SIZE,
    AllowMissingOption,
    DebugOption,
    InputSizeOption,
    JsonOption,
    ModelKwargsOption,
    NumClassesOption,
    StrictValuesOption,
    TrustCodeOption,
    UsageError,
    WeightsOption,
    check_file,
    check_weights,
    err_console,
    handle_errors,
    load_model,
    model_default_size,
    out_console,
    parse_input_size,
    parse_overrides,
    parse_sizes,
    print_json,
)
from .profile import LatencyTableOption, load_table, predicted_line

if TYPE_CHECKING:
    from torch import nn

    from ..presets import Preset

PLACEMENTS = ("post", "pre")


@dataclass
class ConvertPlan:
    """Conversion options after merging a preset/config with the command-line flags (flags win)."""

    input_size: tuple[int, ...]
    num_classes: int | None
    placement: str
    init_scale: float | None
    first_init_scale: float | None
    overrides: dict[str, Any] | None
    sizes: list[tuple[int, ...]] | None


def _load_preset(preset: str | None, config: Path | None, trust_code: bool = False) -> Preset | None:
    from ..presets import load_preset, load_preset_file

    if preset and config:
        raise UsageError("give either --preset or --config, not both")
    if preset:
        return load_preset(preset, trust_code)
    if config:
        return load_preset_file(config, trust_code)
    return None


def make_plan(
    preset: Preset | None,
    input_size: str | tuple[int, ...] | None,
    num_classes: int | None,
    placement: str | None,
    init_scale: float | None,
    override: list[str] | None,
    sizes: str | None,
) -> ConvertPlan:
    """Merge preset options and flags into one validated plan (``input_size``: the flag's text, or a checked size)."""
    opts = preset.convert if preset else None
    chosen = placement or (opts.placement if opts else "post")
    if chosen not in PLACEMENTS:
        raise UsageError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {chosen!r}")
    if init_scale is not None and not (math.isfinite(init_scale) and 0 < init_scale <= MAX_SCALE):
        raise UsageError(f"--init-scale must be a finite number > 0 and at most {MAX_SCALE:g}, got {init_scale}")
    default = opts.input_size if opts else DEFAULT_INPUT_SIZE
    size = input_size if isinstance(input_size, tuple) else parse_input_size(input_size, default)
    return ConvertPlan(
        input_size=size,
        num_classes=num_classes if num_classes is not None else (opts.num_classes if opts else None),
        placement=chosen,
        init_scale=init_scale if init_scale is not None else (opts.init_scale if opts else None),
        first_init_scale=opts.first_init_scale if opts and init_scale is None else None,
        overrides=parse_overrides(override),
        sizes=parse_sizes(sizes, len(size)),
    )


def _replacements(report_dict: dict[str, Any]) -> list[dict[str, Any]]:
    return list(report_dict.get("replacements") or [])


def _first_node(report_dict: dict[str, Any]) -> str | None:
    rows = _replacements(report_dict)
    return next((row.get("node") or row.get("name") for row in rows), None) if rows else None


def run_conversion(
    model: nn.Module,
    plan: ConvertPlan,
    source: Any,
    leaf_modules: Sequence[Any] = (),
    head: str = "none",
    submodule: str | None = None,
) -> tuple[nn.Module, Any]:
    """Convert ``model`` (or its part ``submodule``) following the plan; a preset's first-layer scale is an override."""
    from .. import engine

    def once(overrides: dict[str, Any] | None, target: nn.Module) -> tuple[nn.Module, Any]:
        # The engine's own argument checks (sizes per tie group, override names) raise OptionError: exit 2.
        return engine.convert(
            target,
            input_size=plan.input_size,
            placement=plan.placement,
            init_scale=plan.init_scale,
            overrides=overrides,
            sizes=plan.sizes,
            leaf_modules=tuple(leaf_modules),
            head=head,
            source=source,
            submodule=submodule,
        )

    first = plan.first_init_scale
    if first is None or plan.sizes:
        return once(plan.overrides, model)
    # The first DynOPool's node name is only known after a conversion: convert a copy to find it.
    _, probe = once(plan.overrides, copy.deepcopy(model))
    node = _first_node(probe.to_dict())
    overrides = dict(plan.overrides or {})
    if node is not None and node not in overrides:
        overrides[node] = first
    return once(overrides or None, model)


def upsampling_notes(model: nn.Module) -> list[str]:
    """One line per DynOPool whose output is larger than its input (after a forward)."""
    from ..layers import DynOPoolNd
    from .render import fmt_size

    notes = []
    for name, module in model.named_modules():
        if isinstance(module, DynOPoolNd) and module.last_in_size and module.last_out_size:
            n_in, n_out = module.last_in_size, module.last_out_size
            if any(o > i for i, o in zip(n_in, n_out, strict=True)):
                what = f"upsamples {fmt_size(n_in)} -> {fmt_size(n_out)}"
                notes.append(f"note: {name} {what} (its target is larger than its input)")
    return notes


@handle_errors
def convert_cmd(
    model: str = typer.Argument(..., help="Model name (resnet50, tv:NAME, timm:NAME) or pkg.module:factory."),
    input_size: str | None = InputSizeOption,
    num_classes: int | None = NumClassesOption,
    model_kwargs: list[str] | None = ModelKwargsOption,
    weights: Path | None = WeightsOption,
    preset: str | None = typer.Option(None, "--preset", help="Named preset, e.g. resnet50-imagenet-s."),
    config: Path | None = typer.Option(None, "--config", help="Preset YAML file."),
    placement: str | None = typer.Option(None, "--placement", help="post (DynOPool after the conv) or pre."),
    init_scale: float | None = typer.Option(None, "--init-scale", metavar="R", help="Initial scale of every DynOPool."),
    override: list[str] | None = typer.Option(
        None, "--override", metavar="NODE=R", help="Initial scale of one node (repeatable); R or RHxRW."
    ),
    sizes: str | None = typer.Option(
        None, "--sizes", metavar="HxW,...", help="Target size per stage at the input size, e.g. 100x96,52x50."
    ),
    leaf_module: list[str] | None = typer.Option(
        None, "--leaf-module", metavar="NAME", help="Keep this submodule opaque to tracing (repeatable)."
    ),
    head: str = typer.Option(
        "none", "--head", help="adapt: pool a flattened map to its original size before a fixed-size Linear."
    ),
    submodule: str | None = typer.Option(
        None,
        "--submodule",
        metavar="PATH",
        help="Convert only this part (e.g. backbone) at its own --input-size; the whole model is kept and saved.",
    ),
    output: Path | None = typer.Option(None, "-o", "--output", help="Save the converted model to this directory."),
    force: bool = typer.Option(False, "--force", help="Replace an existing saved model at -o (nothing else)."),
    trust_code: bool = TrustCodeOption,
    strict_values: bool = StrictValuesOption,
    latency_table: Path | None = LatencyTableOption,
    json_out: bool = JsonOption,
    allow_missing: bool = AllowMissingOption,
    debug: bool = DebugOption,
) -> None:
    """Replace a model's resizers (pooling, strided convs) by DynOPools and report the result."""
    from ..io.output import replace_output
    from ..io.recipe import HEADS, SAVED_MODEL, resolve_leaf

    # Every argument that needs no torch is checked before the slow imports.
    plan = make_plan(
        _load_preset(preset, config, trust_code), input_size, num_classes, placement, init_scale, override, sizes
    )
    if head not in HEADS:
        raise UsageError(f"--head must be {' or '.join(HEADS)}, got {head!r}")
    check_weights(weights)
    check_file(latency_table, "--latency-table")
    with contextlib.ExitStack() as stack:
        # -o is locked and checked before any slow work, and held until the model is written.
        work = stack.enter_context(replace_output(output, SAVED_MODEL, force)) if output is not None else None
        from ..cost import original_stage_sizes
        from ..engine.submodule import resolve_part
        from ..io.saving import verify_saved, write_saved
        from .render import compare_table, dynopool_table, mismatch_table, replacement_table, safe, skipped_table
        from .summary import recorded_summary, summarize

        table = load_table(latency_table)
        loaded = load_model(model, plan.num_classes, model_kwargs, weights, allow_missing, trust_code, strict_values)
        if loaded.is_saved:
            raise UsageError(f"{model} is already a converted dynoswap model; use `dynoswap inspect {model}`")
        leaves = [resolve_leaf(name, trust_code=trust_code, where="--leaf-module") for name in leaf_module or ()]
        if input_size is None and (preset is None and config is None) and not submodule:
            plan = replace(plan, input_size=model_default_size(loaded.model, model))
        gm, report = run_conversion(loaded.model, plan, loaded.source, leaves, head, submodule)
        # With --submodule the facts are the part's (its input size); the whole model is what is saved.
        part, original = (
            (resolve_part(gm, submodule), resolve_part(loaded.model, submodule)) if submodule else (gm, loaded.model)
        )
        # Row for row with the converted model's stages: what the original resizers produced there.
        before_stages = original_stage_sizes(part, report)
        library = loaded.source.library
        before = summarize(original, plan.input_size, model, library, stages=before_stages, submodule=submodule)
        after = summarize(part, plan.input_size, model, library, submodule=submodule)
        report_dict = report.to_dict()
        latency = None
        if table is not None:
            from ..cost.latency import predict_latency

            latency = predict_latency(part, table, plan.input_size)
        if work is not None:
            write_saved(gm, work, recorded_summary(after))
            verify_saved(gm, work)
    for note in upsampling_notes(gm):
        err_console().print(note)

    if json_out:
        data = after.to_dict()
        data.update(
            before=before.to_dict(),
            after=after.to_dict(),
            replacements=_replacements(report_dict),
            skipped=list(report_dict.get("skipped") or []),
            output=str(output) if output is not None else None,
        )
        if table is not None:
            data["latency"] = {"predicted_ms": latency, "backend": table.backend, "batch": table.batch}
        if loaded.mismatch:
            data["checkpoint"] = {"missing": loaded.mismatch.missing, "unexpected": loaded.mismatch.unexpected}
        print_json(data)
        return
    console = out_console()
    if loaded.mismatch:
        err_console().print(mismatch_table(loaded.mismatch))
    if callable(getattr(report, "table", None)):
        console.print(report.table())
    else:
        console.print(replacement_table(_replacements(report_dict)))
        if report_dict.get("skipped"):
            console.print(skipped_table(report_dict["skipped"]))
    console.print(compare_table(before, after))
    if table is not None and latency is not None:
        console.print(predicted_line(latency, table))
    console.print(dynopool_table(after.dynopools))
    if output is not None:
        console.print(f"saved to {safe(output)}")


def register(app: typer.Typer) -> None:
    """Add the ``convert`` command."""
    app.command("convert", no_args_is_help=True)(convert_cmd)
