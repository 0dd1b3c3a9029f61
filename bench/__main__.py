"""`make bench`: run every bench/bench_*.py and print one table of ratios and timings.

Each module exposes ``run() -> list[Row]``. Ratios are measured side by side in
the same process, since absolute times on shared machines are noisy.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import torch
from rich.console import Console
from rich.table import Table

import bench


def main(argv: list[str]) -> int:
    """Run the selected benchmark modules (all by default) and print their rows."""
    torch.set_num_threads(2)
    wanted = set(argv)
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if m.name.startswith("bench_"))
    table = Table(title=f"dynoswap benchmarks (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for col in ("group", "measure", "value", "target", "ok"):
        table.add_column(col, justify="right" if col == "value" else "left")
    for name in names:
        if wanted and name.removeprefix("bench_") not in wanted and name not in wanted:
            continue
        module = importlib.import_module(f"bench.{name}")
        for row in module.run():
            ok = "" if row.ok is None else ("yes" if row.ok else "NO")
            table.add_row(row.group, row.name, f"{row.value:.3g} {row.unit}", row.target, ok)
    # Piped output (logs, CI) would otherwise fold the table to 80 columns.
    Console(width=None if sys.stdout.isatty() else 120).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
