"""``dynoswap paper table1``: the paper's Table 1 and 4 GMACs and supplement Table 3, recomputed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from .common import DebugOption, JsonOption, UsageError, err_console, handle_errors, out_console, print_json

if TYPE_CHECKING:
    from rich.table import Table

    from ..zoo.paper_tables import RowResult, ShareResult

#: Data set names accepted by --dataset, as the paper prints them.
DATASETS = {"aircraft": "FGVC-Aircraft", "cifar100": "CIFAR-100", "imagenet": "ImageNet", "voc": "PascalVOC"}

paper_app = typer.Typer(help="Reproduce the paper's tables with dynoswap's cost model.", no_args_is_help=True)


def _sizes(sizes: list[tuple[int, ...]] | tuple[tuple[int, ...], ...]) -> str:
    return "\n".join(f"{h}x{w}" for h, w in sizes)  # one stage per line: a size is never cut


def rows_table(results: list[RowResult]) -> Table:
    """Paper GMACs next to dynoswap's, one row per printed row: fits 80 columns and cuts no value."""
    from rich import box
    from rich.table import Table

    table = Table(
        title="GMACs at the paper's printed sizes (T: Table 1, or 4 for HRNet-W48)",
        box=box.SIMPLE_HEAD,
        padding=0,
        pad_edge=False,
        show_edge=False,
    )
    rows = []
    for res in results:
        r = res.row
        rows.append(
            [
                r.table,
                r.backbone,
                r.dataset,
                r.model,
                _sizes(r.printed_sizes),
                f"{r.paper_gmacs:.2f}",
                f"{res.gmacs:.3f}",
                f"{res.difference:+.1%}",
                res.status,
            ]
        )
    for i, column in enumerate(("T", "backbone", "data", "model", "sizes", "paper", "dynoswap", "diff", "status")):
        # Each column as wide as its longest value (or header word), so nothing is cut or broken mid-word.
        widest = max([len(line) for row in rows for line in row[i].splitlines()] + [len(column)])
        right = column in ("paper", "dynoswap", "diff")
        table.add_column(column, justify="right" if right else "left", min_width=widest, overflow="fold")
    for row, res in zip(rows, results, strict=True):
        style = {"ok": "green", "rounding": "yellow", "disagrees": "yellow"}.get(res.status, "red")
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/]")
    return table


def shares_table(shares: list[ShareResult]) -> Table:
    """Supplement Table 3: DynOPool's share of the GMACs, the paper's and dynoswap's per Table 1 row."""
    from rich.table import Table

    table = Table(title="DynOPool's share of the GMACs (supplement Table 3)")
    for column in ("backbone", "data", "paper", "Human sizes", "DynOPool-S", "DynOPool-B"):
        table.add_column(column, justify="left" if column in ("backbone", "data") else "right")
    for share in shares:
        values = [share.percent_by_model.get(m) for m in ("Human", "DynOPool-S", "DynOPool-B")]
        table.add_row(
            share.backbone,
            share.dataset,
            f"{share.paper_percent:.2f} %",
            *(f"{v:.2f} %" if v is not None else "-" for v in values),
        )
    return table


@handle_errors
def table1_cmd(
    dataset: list[str] | None = typer.Option(
        None, "--dataset", help="Only these data sets (repeatable): aircraft, cifar100, imagenet, voc."
    ),
    json_out: bool = JsonOption,
    debug: bool = DebugOption,
) -> None:
    """Count every row of Table 1 and Table 4 at its printed sizes and compare with the printed GMACs.

    Rows where the paper disagrees with itself are marked with the reason, not tuned away.
    Supplement Table 3 (DynOPool's share of the GMACs) follows, with the counting convention.
    """
    unknown = sorted(set(dataset or ()) - set(DATASETS))
    if unknown:  # checked before the slow imports
        raise UsageError(f"--dataset {', '.join(unknown)}: not a data set of the paper; use {', '.join(DATASETS)}")
    from ..zoo.paper_tables import TOLERANCE, compute_rows, dynopool_shares, paper_rows, share_convention

    chosen = [DATASETS[d] for d in dataset] if dataset else None
    rows = paper_rows(datasets=chosen)
    progress = err_console()

    def on_row(res: RowResult) -> None:
        if not json_out:
            r = res.row
            progress.print(f"counted {r.backbone} {r.dataset} {r.model}: {res.gmacs:.3f} GMACs", style="dim")

    results = compute_rows(rows, on_row)
    shares = dynopool_shares(results)
    if json_out:
        data: dict[str, Any] = {
            "tolerance": TOLERANCE,
            "rows": [r.to_dict() for r in results],
            "supplement_table3": [s.to_dict() for s in shares],
            "share_convention": share_convention(shares),
        }
        print_json(data)
        return
    console = out_console()
    console.print(rows_table(results))
    for res in results:
        if res.reason:
            r = res.row
            console.print(f"- {r.backbone} {r.dataset} {r.model} ({res.difference:+.1%}): {res.reason}")
    if shares:
        console.print(shares_table(shares))
        console.print(share_convention(shares))


def register(app: typer.Typer) -> None:
    """Add the ``paper`` command group."""
    paper_app.command("table1")(table1_cmd)
    app.add_typer(paper_app, name="paper")
