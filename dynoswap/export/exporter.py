"""export_model(): freeze, write ONNX or a torch.export program, and verify the file against eager."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cost.memory import check_forward_budget
from ..errors import ExportError, FrozenSizeError, OptionError
from ..layers import DynOPoolNd
from ..validate import check_input_extent
from .formats import DEFAULT_OPSET, Format, format_of_path, leaves, lookup_format
from .freeze import FROZEN_KEY, RECIPE_KEY, example_input, freeze, is_frozen

#: Largest accepted difference between the written file's outputs and the eager model's.
DEFAULT_ATOL = 1e-4
#: Seed of the random verification input (reproducible reports).
VERIFY_SEED = 0


@dataclass
class ExportResult:
    """What was written and how well it matches the eager model.

    Attributes:
        path: The written file.
        format: ``onnx`` or ``pt2``.
        input_size: (H, W) the model was frozen and traced at ((L,) or (T, H, W) for 1-D and 3-D models).
        in_channels: Channels of the input (the C of (N, C, ...)).
        batch: Batch size of the traced example (any batch when ``dynamic_batch``).
        dynamic_batch: Whether the batch dimension is dynamic.
        opset: ONNX opset (None for pt2).
        dynopools: Number of DynOPool layers frozen.
        freeze_max_abs_diff: max |frozen - converted| in eager mode (None when nothing was frozen).
        max_abs_diff: max |file - eager| over the verification inputs.
        verified_batches: Batch sizes the file was run at.
        runner: What ran the file.
        file_bytes: Size of the file.
        seconds: Wall time of freezing + writing, and of verifying.
    """

    path: Path
    format: str
    input_size: tuple[int, ...]
    in_channels: int
    batch: int
    dynamic_batch: bool
    opset: int | None
    dynopools: int
    freeze_max_abs_diff: float | None
    max_abs_diff: float
    verified_batches: list[int]
    runner: str
    file_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        data = asdict(self)
        data["path"] = str(self.path)
        data["input_size"] = list(self.input_size)
        return data


def default_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """Return the input size a model was frozen at, else the one it was converted at (from its recipe)."""
    recipe = (getattr(model, "meta", None) or {}).get(RECIPE_KEY) or {}
    size = (recipe.get(FROZEN_KEY) or {}).get("input_size") or recipe.get("input_size")
    return tuple(int(v) for v in size) if size else None


def _max_abs_diff(got: list[torch.Tensor], expected: list[torch.Tensor], what: str) -> float:
    if len(got) != len(expected):
        raise ExportError(f"{what} has {len(got)} outputs, the eager model {len(expected)}")
    worst = 0.0
    for g, e in zip(got, expected, strict=True):
        if tuple(g.shape) != tuple(e.shape):
            raise ExportError(f"{what} output has shape {tuple(g.shape)}, the eager model {tuple(e.shape)}")
        diff = (g.detach().cpu().double() - e.detach().cpu().double()).abs()
        if diff.numel():
            worst = max(worst, float(diff.max()) if not diff.isnan().any() else float("inf"))
    return worst


def _first_line(exc: BaseException, limit: int = 300) -> str:
    return " ".join(str(exc).split())[:limit]


def _eager(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return leaves(model(x))


def _verify_batches(batch: int, dynamic_batch: bool) -> list[int]:
    return [batch, batch + 1] if dynamic_batch else [batch]


def verify_export(
    path: str | os.PathLike,
    model: nn.Module,
    input_size: Sequence[int],
    *,
    batch: int = 1,
    dynamic_batch: bool = False,
    fmt: str | None = None,
    atol: float = DEFAULT_ATOL,
) -> float:
    """Run a written file on random inputs and compare with the eager ``model``.

    Args:
        path: The exported file.
        model: The eager model it must match (converted or frozen).
        input_size: (H, W) of the inputs ((L,) or (T, H, W) for 1-D and 3-D models).
        batch: Batch size; with ``dynamic_batch`` the file is also run at ``batch + 1``.
        dynamic_batch: Whether the file accepts any batch size.
        fmt: Format name; default from the file suffix.
        atol: Largest accepted max abs difference.

    Returns:
        The max abs difference.

    Raises:
        ExportError: the file cannot be run, or differs by more than ``atol``.
    """
    path = Path(path)
    spec = lookup_format(fmt) if fmt is not None else format_of_path(path)
    spec.check_available()
    was_training = model.training
    model.eval()
    try:
        inputs = [
            example_input(model, input_size, n, seed=VERIFY_SEED + n) for n in _verify_batches(batch, dynamic_batch)
        ]
        try:
            outputs = spec.run(path, inputs)
        except Exception as exc:
            raise ExportError(f"{spec.runner} cannot run {path}: {type(exc).__name__}: {_first_line(exc)}") from exc
        what = f"{path.name} ({spec.runner})"
        worst = max(_max_abs_diff(got, _eager(model, x), what) for got, x in zip(outputs, inputs, strict=True))
    finally:
        model.train(was_training)
    if not worst <= atol:
        raise ExportError(f"{path} does not match the eager model: max abs diff {worst:.3g} > {atol:g}")
    return worst


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str = "onnx",
    *,
    input_size: Sequence[int] | None = None,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    atol: float = DEFAULT_ATOL,
    overwrite: bool = False,
) -> ExportResult:
    """Freeze ``model`` at ``input_size``, write it as ``fmt`` and verify the file against eager.

    The file is verified before it is moved into place: a file that does not match is never left at ``path``.

    Args:
        model: A converted model (frozen here, batch norm folded), a frozen model, or a plain model
            (written as is).
        path: Output file.
        fmt: ``"onnx"`` (``torch.onnx.export(dynamo=True)``) or ``"pt2"`` (``torch.export.save``).
        input_size: (H, W) ((L,) or (T, H, W) for 1-D and 3-D models); default: the size the model
            was frozen or converted at.
        batch: Batch size of the traced example.
        dynamic_batch: Make the batch dimension dynamic.
        opset: ONNX opset (>= 18).
        atol: Largest accepted max abs difference between file and eager model.
        overwrite: Replace an existing file.

    Returns:
        The :class:`ExportResult`.

    Raises:
        ExportError: a missing export extra, an export that fails, or a file that does not match.
        FrozenSizeError: a fixed-size frozen model asked for another input size.
    """
    from ..io.output import replace_output

    spec: Format = lookup_format(fmt)
    spec.check_available()
    if Path(path).suffix.lower() != spec.suffix:
        raise ExportError(f"{path}: a {spec.name} file must be named *{spec.suffix}")
    if opset < DEFAULT_OPSET:
        raise ExportError(f"opset {opset} is too old: the exporter needs opset >= {DEFAULT_OPSET}")
    if batch < 1:
        raise ExportError(f"batch must be >= 1, got {batch}")
    size = tuple(int(v) for v in input_size) if input_size is not None else default_input_size(model)
    if size is None or len(size) not in (1, 2, 3) or min(size) < 1:
        raise ExportError(f"an input size (H, W) is needed to export {type(model).__name__}, got {input_size!r}")
    try:
        check_input_extent(size, "input size", max(batch, 2) if dynamic_batch else batch)
        check_forward_budget(model, size, "input size", max(batch, 2) if dynamic_batch else batch)
    except ValueError as exc:
        raise OptionError(str(exc)) from exc
    frozen_at = (model.meta[RECIPE_KEY][FROZEN_KEY].get("input_size") if is_frozen(model) else None) or None  # type: ignore[union-attr,index]
    if frozen_at is not None and tuple(frozen_at) != size:
        raise FrozenSizeError(f"the model is frozen at input size {tuple(frozen_at)}, not {size}")

    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        dynopools = sum(isinstance(m, DynOPoolNd) for m in model.modules())
        # An exported file is for inference: batch norm folded into its conv (no BatchNormalization node).
        target = freeze(model, size, fold_bn=True).eval() if dynopools else model
        # Tracing a batch of 1 would pin a dynamic batch dimension to 1.
        trace_batch = max(batch, 2) if dynamic_batch else batch
        example = example_input(model, size, trace_batch, seed=VERIFY_SEED)
        freeze_diff = (
            _max_abs_diff(_eager(target, example), _eager(model, example), "the frozen model") if dynopools else None
        )
        with replace_output(path, spec.output_kind, force=overwrite) as tmp:
            try:
                spec.write(target, example, tmp, dynamic_batch, opset)
            except ExportError:
                raise
            except Exception as exc:
                name = type(model).__name__
                raise ExportError(
                    f"{spec.name} export of {name} failed: {type(exc).__name__}: {_first_line(exc)}"
                ) from exc
            written = time.perf_counter()
            worst = verify_export(tmp, model, size, batch=batch, dynamic_batch=dynamic_batch, fmt=spec.name, atol=atol)
            verified = time.perf_counter()
            file_bytes = tmp.stat().st_size
    finally:
        model.train(was_training)
    return ExportResult(
        path=Path(path),
        format=spec.name,
        input_size=size,
        in_channels=int(example.shape[1]),
        batch=batch,
        dynamic_batch=dynamic_batch,
        opset=opset if spec.name == "onnx" else None,
        dynopools=dynopools,
        freeze_max_abs_diff=freeze_diff,
        max_abs_diff=worst,
        verified_batches=_verify_batches(batch, dynamic_batch),
        runner=spec.runner,
        file_bytes=file_bytes,
        seconds={"write": round(written - started, 3), "verify": round(verified - written, 3)},
    )
