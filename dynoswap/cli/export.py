"""``dynoswap export MODEL_OR_DIR --format onnx|pt2 -o FILE``: freeze, write, verify against eager."""

from __future__ import annotations

from pathlib import Path

import typer

from .common import (
    INPUT_SIZE_METAVAR,
    AllowMissingOption,
    DebugOption,
    JsonOption,
    ModelKwargsOption,
    NumClassesOption,
    UsageError,
    WeightsOption,
    check_weights,
    handle_errors,
    load_model,
    model_default_size,
    out_console,
    parse_input_size,
    print_json,
)

FORMATS = ("onnx", "pt2")


@handle_errors
def export_cmd(
    model: str = typer.Argument(..., help="Saved model directory (converted or frozen), or a model name."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx (torch.onnx dynamo exporter) or pt2 (torch.export)."),
    output: Path = typer.Option(..., "-o", "--output", help="File to write (.onnx or .pt2)."),
    input_size: str | None = typer.Option(
        None,
        "--input-size",
        metavar=INPUT_SIZE_METAVAR,
        help="Input height and width; 1 number for a 1-D model, 3 for a 3-D one (default: the size the model "
        "was frozen or converted at, else 224 224).",
    ),
    batch: int = typer.Option(1, "--batch", min=1, help="Batch size of the traced input."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Accept any batch size."),
    opset: int = typer.Option(18, "--opset", min=18, help="ONNX opset (>= 18)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output."),
    num_classes: int | None = NumClassesOption,
    model_kwargs: list[str] | None = ModelKwargsOption,
    weights: Path | None = WeightsOption,
    allow_missing: bool = AllowMissingOption,
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Freeze the learned sizes into standard ops, write ONNX or a torch.export program, verify it."""
    from ..export.formats import lookup_format
    from ..io.output import check_output

    # Every argument that needs no torch is checked before the slow imports.
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    spec = lookup_format(fmt)
    spec.check_available()  # a missing extra, a wrong suffix or an occupied -o fails before any slow work
    if output.suffix.lower() != spec.suffix:
        raise UsageError(f"-o {output}: a {spec.name} file must be named *{spec.suffix} (or pick --format)")
    given_size = parse_input_size(input_size) if input_size else None
    check_weights(weights)
    check_output(output, spec.output_kind, force)
    from ..export import default_input_size, export_model

    loaded = load_model(model, num_classes, model_kwargs, weights, allow_missing)
    size = given_size or default_input_size(loaded.model) or model_default_size(loaded.model, model)
    result = export_model(
        loaded.model,
        output,
        fmt,
        input_size=size,
        batch=batch,
        dynamic_batch=dynamic_batch,
        opset=opset,
        overwrite=force,
    )
    if json_out:
        data = result.to_dict()
        data["model"] = model
        print_json(data)
        return
    h, w = result.input_size
    batch_dim = "N" if result.dynamic_batch else str(result.batch)
    opset_note = f", opset {result.opset}" if result.opset is not None else ""
    from .render import safe

    console = out_console()
    console.print(f"wrote {safe(result.path)} ({result.format}{opset_note}, {result.file_bytes / 1e6:.1f} MB)")
    console.print(
        f"input: ({batch_dim}, {result.in_channels}, {h}, {w}); "
        f"{result.dynopools} DynOPools frozen at their sizes for {h}x{w}"
    )
    if result.freeze_max_abs_diff is not None:
        console.print(f"frozen vs converted (eager): max abs diff {result.freeze_max_abs_diff:.3g}")
    batches = ", ".join(str(b) for b in result.verified_batches)
    console.print(
        f"verified with {result.runner} (batch {batches}): max abs diff {result.max_abs_diff:.3g} (limit 1e-4)"
    )


def register(app: typer.Typer) -> None:
    """Add the ``export`` command."""
    app.command("export", no_args_is_help=True)(export_cmd)
