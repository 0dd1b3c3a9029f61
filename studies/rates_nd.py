"""Learned rates against the fixed design at equal real cost, in 1-D (audio) and 3-D (video).

For each set: the zoo's human-designed model is converted at the set's own input size; its budget is
a fraction of the converted model's cost. Two designs train on that budget, with the same seeds and
schedule: ``fixed`` keeps the design's shape (its alphas do not learn; the budget scales every stage
by one common factor, as ``fit`` does before training) and ``learned`` learns every stage's rate per
axis (the default protocol: warm-up, search, then fixed sizes). Both end at the same real cost
(``count_gmacs``, within 3%). Writes ``rates_nd.json`` and ``rates_nd.md`` to ``--out``.

Run with ``make study-nd`` (12 runs, about 15 minutes on a quiet 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynoswap import convert, count_gmacs, stage_sizes
from dynoswap.models import resolve
from dynoswap.train import fit, load_data, make_loaders
from dynoswap.train.protocol import ALPHA_LR


@dataclass(frozen=True)
class Setup:
    """One study: a data set, the zoo model that is its human design, and how it trains."""

    data: str
    model: str
    kwargs: dict[str, Any]
    budget: float
    epochs: int
    what: str


SETUPS = {
    "video": Setup(
        "moving-bars",
        "video-tiny",
        {},
        0.6,
        5,
        "frames are redundant, one-pixel gratings are not: a rate per axis can drop time and keep space",
    ),
    "audio": Setup(
        "pulses",
        "m5",
        {"width": 0.25},
        1.0,
        6,
        "a carrier needs the full rate at the first layer, little after it; the budget is the design's own cost "
        "(its first conv at full rate leaves little room below it)",
    ),
}


def run(setup: Setup, design: str, seed: int, batch_size: int = 64) -> dict[str, Any]:
    """Train one design on one seed; return its accuracy, real cost and stage sizes."""
    torch.manual_seed(seed)
    bundle = load_data(setup.data, seed=seed)
    model, _ = resolve(setup.model, bundle.num_classes, dict(setup.kwargs))
    gm, _ = convert(model, bundle.input_size)
    start = count_gmacs(gm, bundle.input_size).total
    target = setup.budget * start
    train, val = make_loaders(bundle, batch_size, seed=seed)
    started = time.perf_counter()
    records = fit(
        gm,
        train,
        val,
        epochs=setup.epochs,
        lr=0.05,
        alpha_lr=ALPHA_LR if design == "learned" else 0.0,
        target_gmacs=target,
        progress=False,
    )
    return {
        "design": design,
        "seed": seed,
        "val_acc": records[-1]["val_acc"],
        "gmacs": count_gmacs(gm, bundle.input_size).total,
        "target_gmacs": target,
        "design_gmacs": start,
        "stages": [list(s) for s in stage_sizes(gm, bundle.input_size)],
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(name: str, setup: Setup, rows: list[dict[str, Any]]) -> str:
    """Markdown: mean ± std per design, and each seed's learned stages."""
    lines = [
        f"### {name}: `{setup.model}` on `{setup.data}`, budget {setup.budget:g}x the converted design's cost",
        "",
        f"{setup.what}. {setup.epochs} epochs, seeds {sorted({r['seed'] for r in rows})}.",
        "",
        "| design | val accuracy (mean ± std) | seeds | real GMACs / budget | stage sizes (seed 0) |",
        "|---|---|---|---|---|",
    ]
    for design in ("fixed", "learned"):
        mine = sorted((r for r in rows if r["design"] == design), key=lambda r: r["seed"])
        if not mine:
            continue
        accs = [r["val_acc"] for r in mine]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ratio = max(abs(r["gmacs"] / r["target_gmacs"] - 1) for r in mine)
        stages = " ".join("x".join(map(str, s)) for s in mine[0]["stages"])
        seeds = " / ".join(f"{a:.3f}" for a in accs)
        mean = f"{statistics.mean(accs):.3f} ± {spread:.3f}"
        lines.append(f"| {design} | {mean} | {seeds} | within {100 * ratio:.1f}% | {stages} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the chosen studies (every seed, both designs) and write the JSON and the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/experiment"))
    parser.add_argument("--studies", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results_file = args.out / "rates_nd.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name in args.studies:
        rows = []
        for seed in range(args.seeds):
            for design in ("fixed", "learned"):
                row = run(SETUPS[name], design, seed)
                print(json.dumps({"study": name, **row}), flush=True)
                rows.append(row)
        results[name] = rows
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    text = ["# Learned rates against the fixed design, 1-D and 3-D (`make study-nd`)", ""]
    text += [table(name, SETUPS[name], results[name]) for name in SETUPS if name in results]
    (args.out / "rates_nd.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
