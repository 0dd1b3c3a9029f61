"""``dynoswap inspect MODEL``: GMACs, params, stage sizes, DynOPools, per-layer table, stage plot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..errors import CheckpointError
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
    check_file,
    check_forward,
    check_weights,
    err_console,
    handle_errors,
    load_model,
    model_default_size,
    out_console,
    parse_input_size,
    print_json,
)
from .profile import LatencyTableOption, load_table, predicted_line

if TYPE_CHECKING:
    from ..cost.latency import LatencyTable
    from ..io.checkpoint import KeyMismatch
    from .summary import ModelSummary


def show(
    summary: ModelSummary,
    json_out: bool,
    mismatch: KeyMismatch | None = None,
    table: LatencyTable | None = None,
    latency: float | None = None,
    plot: Path | None = None,
) -> None:
    """Print what inspect found: one JSON object, or the tables."""
    from .render import dynopool_table, layer_table, mismatch_table, safe, summary_table

    if json_out:
        data = summary.to_dict()
        if mismatch:
            data["checkpoint"] = {"missing": mismatch.missing, "unexpected": mismatch.unexpected}
        if table is not None:
            data["latency"] = {"predicted_ms": latency, "backend": table.backend, "batch": table.batch}
        print_json(data)
        return
    console = out_console()
    if mismatch:
        err_console().print(mismatch_table(mismatch))
    console.print(summary_table(summary))
    if table is not None and latency is not None:
        console.print(predicted_line(latency, table))
    if summary.dynopools:
        console.print(dynopool_table(summary.dynopools))
    if summary.layers:
        console.print(layer_table(summary.layers))
    if plot is not None:
        console.print(f"stage plot written to {safe(plot)}")


def read_recorded(spec: str, size: tuple[int, ...] | None, trust_code: bool) -> ModelSummary | None:
    """Return a saved folder's summary from its files alone (recipe and safetensors), or None to build the model.

    The recorded summary is used when it is there, was taken at the requested input size and
    its DynOPool alphas are the ones in the weights file; the recipe passes the same trust
    checks as a load (nothing is imported), the weights' header is checked, their alphas
    validated and any NaN or infinity reported. Anything else (no record, as in a training
    checkpoint or a ``dynoswap.save()`` folder; a frozen model; bfloat16 weights) returns None: the
    model is built.
    """
    from ..io.checkpoint import read_safetensors_light, report_nonfinite
    from ..io.output import repair_if_needed
    from ..io.recipe import RECIPE_FILE, WEIGHTS_FILE, Recipe, check_leaf, is_saved_model, read_summary
    from ..io.run import saved_model_folder
    from ..sources import SAVED, check_source
    from ..validate import check_alpha
    from .summary import from_recorded

    repair_if_needed(spec)
    folder = saved_model_folder(spec)  # a run folder's final model (its checkpoint verified first)
    if not is_saved_model(folder):
        return None
    record = read_summary(folder)
    if record is None or (size is not None and tuple(record["input_size"]) != size):
        return None
    recipe = Recipe.read(folder)
    where = str(folder / RECIPE_FILE)
    if recipe.source is None or recipe.frozen is not None or tuple(record["input_size"]) != recipe.input_size:
        return None
    check_source(recipe.source, trust_code=trust_code, where=where, names=False)
    for leaf in recipe.options.leaf_modules:
        check_leaf(leaf, trust_code=trust_code, where=where)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        return None  # the build path says what is missing
    # Each DynOPool shows its group leader's alpha, stored once (an alias may name the stored key).
    leaders = {f"{row['group']}.alpha" for row in record["dynopools"]}
    keys = {key: recipe.aliases.get(key, key) for key in leaders}
    read = read_safetensors_light(weights, set(keys.values()))
    if read is None:
        return None
    values, nonfinite = read
    for key, alpha in values.items():
        try:
            check_alpha(alpha, f"{weights}: {key}")
        except ValueError as exc:
            raise CheckpointError(f"{exc}; the file is damaged") from exc
    if any(values[keys[f"{row['group']}.alpha"]] != row["alpha"] for row in record["dynopools"]):
        return None  # the weights were changed after the record: build the model
    report_nonfinite(nonfinite, str(weights))
    return from_recorded(record, spec, SAVED)


@handle_errors
def inspect_cmd(
    model: str = typer.Argument(..., help="Model name (resnet50, tv:NAME, timm:NAME, pkg.mod:factory) or saved model."),
    input_size: str | None = InputSizeOption,
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
    from ..io.recipe import input_size_of, part_of
    from .summary import summarize

    # Every argument that needs no torch is checked before the slow imports.
    given_size = parse_input_size(input_size) if input_size else None
    check_weights(weights)
    check_file(latency_table, "--latency-table")
    if plot is not None:
        from ..io.figures import check_plot_path
        from .plot import require_matplotlib

        check_plot_path(plot, force)
        require_matplotlib()
    if not (depth or plot or latency_table or weights or num_classes or model_kwargs or strict_values):
        # A saved folder's own record answers without building the model (or importing torch).
        recorded = read_recorded(model, given_size, trust_code)
        if recorded is not None:
            show(recorded, json_out)
            return
    table = load_table(latency_table)
    loaded = load_model(model, num_classes, model_kwargs, weights, allow_missing, trust_code, strict_values)
    from ..engine.submodule import resolve_part

    size = given_size or input_size_of(loaded.model) or model_default_size(loaded.model, model)
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
    show(summary, json_out, loaded.mismatch, table, latency, plot)


def register(app: typer.Typer) -> None:
    """Add the ``inspect`` command."""
    app.command("inspect", no_args_is_help=True)(inspect_cmd)
