"""``dynoswap profile MODEL``: measure a latency table (per-layer latency vs size) and write it as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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
    UsageError,
    WeightsOption,
    handle_errors,
    load_model,
    model_default_size,
    out_console,
    print_json,
)

if TYPE_CHECKING:
    from ..cost.latency import LatencyTable


LatencyTableOption = typer.Option(
    None,
    "--latency-table",
    metavar="T.json",
    help="Also report the latency this table (from `dynoswap profile`) predicts.",
)


def load_table(path: Path | None) -> LatencyTable | None:
    """Read the ``--latency-table`` file before any slow work (None when not given)."""
    if path is None:
        return None
    from ..cost.latency import LatencyTable

    return LatencyTable.load(path)


def predicted_line(ms: float, table: LatencyTable) -> str:
    """One line saying what a table predicts, and for which backend and batch."""
    return f"predicted latency: {ms:.3g} ms ({table.backend}, batch {table.batch}, {table.device})"


@handle_errors
def profile_cmd(
    model: str = typer.Argument(..., help="Model name (resnet18, tv:NAME, timm:NAME) or a saved converted model."),
    output: Path = typer.Option(..., "-o", "--output", metavar="T.json", help="Write the latency table here."),
    input_size: str | None = InputSizeOption,
    num_classes: int | None = NumClassesOption,
    model_kwargs: list[str] | None = ModelKwargsOption,
    weights: Path | None = WeightsOption,
    placement: str = typer.Option("post", "--placement", help="post or pre (a model that is not converted yet)."),
    backend: str = typer.Option("eager", "--backend", help="eager (CPU), onnxruntime (CPU) or cuda."),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size of every timing."),
    repeats: int = typer.Option(5, "--repeats", min=1, help="Timed calls per measurement (the fastest is kept)."),
    calibrate: int = typer.Option(8, "--calibrate", min=0, help="Random size settings for the calibration."),
    validate: int = typer.Option(20, "--validate", min=0, help="Held-out size settings for the reported error."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads of torch and ONNX Runtime."),
    force: bool = typer.Option(False, "--force", help="Replace an existing latency table at -o."),
    trust_code: bool = TrustCodeOption,
    strict_values: bool = StrictValuesOption,
    allow_missing: bool = AllowMissingOption,
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Measure each MAC-bearing layer's latency against its size on this machine and save a latency table."""
    from ..io.recipe import input_size_of
    from .common import check_weights, parse_input_size
    from .convert import PLACEMENTS, make_plan, run_conversion

    # Every argument that needs no torch is checked before the slow imports.
    if placement not in PLACEMENTS:
        raise UsageError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    given_size = parse_input_size(input_size) if input_size else None
    check_weights(weights)
    import torch

    from ..cost.latency import OUTPUT_KIND, lookup_backend, profile
    from ..io.output import check_output

    lookup_backend(backend)  # an unknown or unavailable backend fails before any slow work
    check_output(output, OUTPUT_KIND, force)
    if threads is not None:
        torch.set_num_threads(threads)
    loaded = load_model(model, num_classes, model_kwargs, weights, allow_missing, trust_code, strict_values)
    if loaded.is_saved:
        converted = loaded.model
        size = given_size or input_size_of(converted) or model_default_size(converted, model)
    else:
        plan = make_plan(None, input_size, num_classes, placement, None, None, None)
        converted, _ = run_conversion(loaded.model, plan, loaded.source)
        size = plan.input_size
    result = profile(
        converted,
        size,
        backend=backend,
        batch=batch,
        repeats=repeats,
        calibrate=calibrate,
        validate=validate,
        name=model,
    )
    table = result.table
    table.save(output, overwrite=force)
    if json_out:
        data = table.to_dict()
        data["output"] = str(output)
        data["settings"] = [
            {"factors": r.factors, "predicted_ms": r.predicted, "measured_ms": r.measured} for r in result.validation
        ]
        print_json(data)
        return
    console = out_console()
    console.print(
        f"{model}: {len(table.layers)} layers timed on {table.backend} ({table.device}), "
        f"input {size[0]}x{size[1]}, batch {batch}"
    )
    console.print(f"calibration: total = {table.scale:.3g} x layers + {table.offset_ms:.3g} ms")
    if table.validation:
        console.print(
            f"held-out settings: {int(table.validation['settings'])}, prediction error median "
            f"{100 * table.validation['median_abs_error']:.1f}%, max {100 * table.validation['max_abs_error']:.1f}%"
        )
    console.print(f"latency table written to {output}")


def register(app: typer.Typer) -> None:
    """Add the ``profile`` command."""
    app.command("profile", no_args_is_help=True)(profile_cmd)
