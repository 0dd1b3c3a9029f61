"""Rich tables for the CLI: summaries, stage comparisons, DynOPools, per-layer rows, key mismatches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich import box
from rich.markup import escape
from rich.table import Table

from ..display import DYNOPOOL_SUFFIX, Name, visible

if TYPE_CHECKING:
    from ..io.checkpoint import KeyMismatch
    from .summary import LayerRow, ModelSummary

BOX = box.SIMPLE_HEAD


__all__ = ["visible"]  # re-exported for the CLI's error lines


def group_numbers(groups: Sequence[str]) -> dict[str, int]:
    """Return each tie group's number: from 1, in the order the groups first appear (rows run in execution order)."""
    numbers: dict[str, int] = {}
    for group in groups:
        numbers.setdefault(group, len(numbers) + 1)
    return numbers


def safe(text: object) -> str:
    """Return a user string (a path, a name from a file) ready for rich: control characters visible, markup escaped."""
    return escape(visible(text))


def fmt_size(size: Sequence[float] | None) -> str:
    """``[56, 56]`` → ``56x56``; ``-`` when unknown."""
    if not size:
        return "-"
    return "x".join(str(int(v)) if float(v).is_integer() else f"{v:.3g}" for v in size)


def fmt_pair(values: Sequence[float] | None) -> str:
    """Two floats as ``0.500, 0.500``."""
    if not values:
        return "-"
    return ", ".join(f"{v:.3f}" for v in values)


def fmt_gmacs(value: float) -> str:
    """GMACs with 4 significant digits."""
    return f"{value:.4g}"


def summary_table(summary: ModelSummary, title: str | None = None) -> Table:
    """Model, source, input size, GMACs, params, stage sizes as one key/value table."""
    table = Table(title=title, box=BOX, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("model", safe(summary.model))
    if summary.submodule:
        table.add_row("converted part", safe(summary.submodule))
    table.add_row("source", safe(summary.source))
    table.add_row("input size", fmt_size(summary.input_size))
    table.add_row("GMACs", fmt_gmacs(summary.gmacs))
    table.add_row("params", f"{summary.params:,}")
    table.add_row("stages", "  ".join(fmt_size(s) for s in summary.stages))
    table.add_row("DynOPools", str(len(summary.dynopools)))
    if summary.frozen:
        table.add_row("frozen", summary.frozen)
    return table


def dynopool_table(rows: list[dict[str, Any]]) -> Table:
    """One row per DynOPool: scale (1/alpha), in → out, tie group (numbered from 1 in execution order)."""
    table = Table(title="DynOPools", box=BOX)
    table.add_column("name")  # shortened in the middle, never at the end, where the terminal is narrow
    table.add_column("scale (1/alpha)", no_wrap=True)
    table.add_column("in → out", no_wrap=True)
    table.add_column("group", justify="right")
    numbers = group_numbers([row["group"] for row in rows])
    for row in rows:
        table.add_row(
            Name(row["name"], suffix=DYNOPOOL_SUFFIX),
            fmt_pair(row["scale"]),
            f"{fmt_size(row['in'])} → {fmt_size(row['out'])}",
            str(numbers[row["group"]]),
        )
    return table


def compare_table(before: ModelSummary, after: ModelSummary) -> Table:
    """GMACs, params and stage sizes before and after conversion, side by side."""
    table = Table(title="Before / after", box=BOX)
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("converted", justify="right")
    table.add_row("GMACs", fmt_gmacs(before.gmacs), fmt_gmacs(after.gmacs))
    table.add_row("params", f"{before.params:,}", f"{after.params:,}")
    for i in range(max(len(before.stages), len(after.stages))):
        b = fmt_size(before.stages[i]) if i < len(before.stages) else ""
        a = fmt_size(after.stages[i]) if i < len(after.stages) else ""
        table.add_row(f"stage {i}", b, a)
    return table


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return fmt_pair(value) if any(isinstance(v, float) for v in value) else fmt_size(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


# Columns of the replacement table: (heading, keys tried in the report's replacement dicts).
REPLACEMENT_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("node", ("node", "name", "target")),
    ("replaced", ("original", "kind", "op", "module")),
    ("rule", ("rule",)),
    ("DynOPool", ("dynopool", "pool", "new")),
    ("init scale", ("init_scale", "scale")),
    ("group", ("group", "tie_group")),
)


def _pick(row: dict[str, Any], keys: tuple[str, ...]) -> Any:
    return next((row[k] for k in keys if k in row), None)


def replacement_table(replacements: list[dict[str, Any]]) -> Table:
    """Every replaced resizer: node, what it was, rule, the DynOPool, init scale, tie group."""
    table = Table(title="Replacements", box=BOX)
    for heading, _ in REPLACEMENT_COLUMNS:
        table.add_column(heading)
    for row in replacements:
        table.add_row(*(Name(_text(_pick(row, keys))) for _, keys in REPLACEMENT_COLUMNS))
    return table


def skipped_table(skipped: list[dict[str, Any]]) -> Table:
    """Resizers left alone and why."""
    table = Table(title="Skipped resizers", box=BOX)
    table.add_column("node")
    table.add_column("kind")
    table.add_column("reason")
    for row in skipped:
        table.add_row(
            Name(_text(_pick(row, ("node", "name", "target")))),
            Name(_text(_pick(row, ("kind", "original", "op")))),
            safe(_text(_pick(row, ("reason", "why")))),
        )
    return table


def layer_table(rows: list[LayerRow]) -> Table:
    """Per-layer output shape and GMACs."""
    table = Table(title="Layers", box=BOX)
    table.add_column("layer")
    table.add_column("type")
    table.add_column("output", justify="right")
    table.add_column("GMACs", justify="right")
    for row in rows:
        shape = "x".join(str(v) for v in row.out_shape) if row.out_shape else "-"
        table.add_row(Name(row.name), Name(row.kind), shape, fmt_gmacs(row.gmacs))
    return table


def mismatch_table(mismatch: KeyMismatch, limit: int = 40) -> Table:
    """Missing, unexpected and reshaped checkpoint keys (at most ``limit`` rows, then a count)."""
    table = Table(title=f"Checkpoint keys: {safe(mismatch.summary())}", box=BOX)
    table.add_column("problem")
    table.add_column("key")
    table.add_column("detail")
    rows = mismatch.rows()
    for problem, key, detail in rows[:limit]:
        table.add_row(problem, Name(key), safe(detail))
    if len(rows) > limit:
        table.add_row("…", f"{len(rows) - limit} more", "")
    return table
