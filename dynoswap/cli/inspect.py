"""``dynoswap inspect MODEL``: GMACs, params, stage sizes, DynOPools, per-layer table, stage plot."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    AllowMissingOption,
    DebugOption,
    InputSizeOption,
    JsonOption,
    ModelKwargsOption,
    NumClassesOption,
    StrictValuesOption,
    TrustCodeOption,
    WeightsOption,
    check_forward,
    err_console,
    handle_errors,
    load_model,
    out_console,
    parse_input_size,
    print_json,
)
from .profile import LatencyTableOption, load_table, predicted_line


@handle_errors
def inspect_cmd(
    model: str = typer.Argument(..., help="Model name (resnet50, tv:NAME, timm:NAME, pkg.mod:factory) or saved model."),
    input_size: tuple[int, int] | None = InputSizeOption,
    num_classes: int | None = NumClassesOption,
    model_kwargs: list[str] | None = ModelKwargsOption,
    weights: Path | None = WeightsOption,
    allow_missing: bool = AllowMissingOption,
    trust_code: bool = TrustCodeOption,
    strict_values: bool = StrictValuesOption,
    depth: int | None = typer.Option(None, "--depth", min=1, help="Per-layer table down to N dotted name levels."),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png", help="Draw the stages to scale (matplotlib)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --plot file that dynoswap wrote."),
    latency_table: Path | None = LatencyTableOption,
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Show a model's GMACs, params, stage sizes and, for converted models, every DynOPool."""
    from ..engine.submodule import resolve_part
    from ..io.recipe import input_size_of, part_of
    from .render import dynopool_table, layer_table, mismatch_table, safe, summary_table
    from .summary import summarize

    if plot is not None:
        from ..io.figures import check_plot_path
        from .plot import require_matplotlib

        require_matplotlib()
        check_plot_path(plot, force)
    table = load_table(latency_table)
    loaded = load_model(model, num_classes, model_kwargs, weights, allow_missing, trust_code, strict_values)
    size = parse_input_size(input_size, input_size_of(loaded.model) or (224, 224))
    # A model with one converted part is shown by that part, at the part's input size.
    part = part_of(loaded.model)
    target = resolve_part(loaded.model, part) if part else loaded.model
    check_forward(target, size)
    summary = summarize(target, size, model, loaded.source.library, depth=depth, submodule=part)
    latency = None
    if table is not None:
        from ..cost.latency import predict_latency

        latency = predict_latency(target, table, size)
    if plot is not None:
        from .plot import plot_stages

        plot_stages({model: summary.stages}, plot, force)
    if json_out:
        data = summary.to_dict()
        if loaded.mismatch:
            data["checkpoint"] = {"missing": loaded.mismatch.missing, "unexpected": loaded.mismatch.unexpected}
        if table is not None:
            data["latency"] = {"predicted_ms": latency, "backend": table.backend, "batch": table.batch}
        print_json(data)
        return
    console = out_console()
    if loaded.mismatch:
        err_console().print(mismatch_table(loaded.mismatch))
    console.print(summary_table(summary))
    if table is not None and latency is not None:
        console.print(predicted_line(latency, table))
    if summary.dynopools:
        console.print(dynopool_table(summary.dynopools))
    if summary.layers:
        console.print(layer_table(summary.layers))
    if plot is not None:
        console.print(f"stage plot written to {safe(plot)}")


def register(app: typer.Typer) -> None:
    """Add the ``inspect`` command."""
    app.command("inspect", no_args_is_help=True)(inspect_cmd)
