"""``make experiment``: the paper's section-3 comparison on the built-in data sets, on CPU.

For each of ``barcodes``, ``digits-stretch``, ``digits-tile`` and ``digits-large``
a small VGG is trained twice with the same budget (epochs, batch, learning rate,
seed): once converted, learning its DynOPool scales with task + lambda * GMACs
loss, and once human-designed, i.e. with every scale frozen at 0.5 (on these
even sizes a DynOPool at r = 0.5 computes exactly 2x2 max pooling, which the run
checks). Writes ``results.md``, ``results.json`` and ``sizes.png`` to ``--out``.

    python -m dynoswap.experiment --out docs/experiment
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

DATASETS = ("barcodes", "digits-stretch", "digits-tile", "digits-large")
MODEL = "dynoswap.train.models:small_vgg"


def _convert(input_size: tuple[int, int], num_classes: int, seed: int):
    from .engine import convert
    from .models import ModelSource

    torch.manual_seed(seed)
    source = ModelSource("user", MODEL, {"num_classes": num_classes})
    original = source.build()
    gm, _ = convert(original, input_size, source=source)
    return original, gm


def _check_same_as_maxpool(original: torch.nn.Module, gm: torch.nn.Module, input_size: tuple[int, int]) -> None:
    x = torch.randn(4, 3, *input_size)
    original.eval(), gm.eval()
    with torch.no_grad():
        if not torch.equal(original(x), gm(x)):
            raise AssertionError("a DynOPool at r=0.5 should equal 2x2 max pooling here")
    original.train(), gm.train()


def run_one(dataset: str, learn: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model on one data set; return its summary row."""
    from .cost import count_gmacs, gmacs_loss, stage_sizes
    from .train import fit, load_data, make_loaders
    from .train.loop import mean_log_aspect

    bundle = load_data(dataset, seed=args.seed)
    original, gm = _convert(bundle.input_size, bundle.num_classes, args.seed)
    if not learn:
        _check_same_as_maxpool(original, gm, bundle.input_size)
    torch.manual_seed(args.seed)
    train, val = make_loaders(bundle, args.batch_size, seed=args.seed)
    g0 = float(gmacs_loss(gm).detach())
    lam = args.lam_share / g0 if learn else 0.0
    started = time.perf_counter()
    records = fit(
        gm,
        train,
        val,
        epochs=args.epochs,
        lam=lam,
        lr=args.lr,
        alpha_lr=args.alpha_lr if learn else 0.0,
        max_steps=args.max_steps,
        input_size=bundle.input_size,
        out=None,  # per-epoch histories go to results.json; checkpoints are not needed here
        progress=False,
    )
    last = records[-1]
    gmacs = count_gmacs(gm if learn else original, bundle.input_size).total
    return {
        "dataset": dataset,
        "model": "DynOPool" if learn else "human-designed",
        "val_acc": last["val_acc"],
        "gmacs": float(gmacs),
        "lambda": lam,
        "stage_sizes": [list(s) for s in stage_sizes(gm, bundle.input_size)],
        "scales": [p["scale"] for p in last["pools"]],
        "mean_log_rw_over_rh": mean_log_aspect(last["pools"]),
        "seconds": round(time.perf_counter() - started, 1),
        "history": [
            {"epoch": r["epoch"], "val_acc": r["val_acc"], "sizes": [p["out"] for p in r["pools"]]} for r in records
        ],
    }


def _fmt_sizes(sizes: list[list[int]]) -> str:
    return " ".join(f"[{h},{w}]" for h, w in sizes)


def write_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Markdown results table plus the two checks of the paper's section 3."""
    lines = [
        "# Section-3 experiment on the built-in data sets",
        "",
        f"Small VGG (widths 16-32-64-64, 3 pooling stages), CPU, {args.epochs} epochs"
        + (f" of at most {args.max_steps} steps" if args.max_steps else "")
        + f", batch {args.batch_size}, SGD momentum 0.9, cosine annealing, lr {args.lr}, seed {args.seed}. "
        f"DynOPool: alpha lr {args.alpha_lr}, lambda = {args.lam_share} / (initial GMACs). "
        "Human-designed: the same model with every scale frozen at 0.5 (= 2x2 max pooling, checked).",
        "",
        "| data | model | val acc | GMACs | stage sizes [h,w] | mean log(r_w/r_h) |",
        "|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['model']} | {r['val_acc']:.3f} | {r['gmacs']:.5f} | "
            f"{_fmt_sizes(r['stage_sizes'])} | {r['mean_log_rw_over_rh']:+.3f} |"
        )
    learned = {r["dataset"]: r for r in rows if r["model"] == "DynOPool"}
    human = {r["dataset"]: r for r in rows if r["model"] != "DynOPool"}
    lines += ["", "## Checks against the paper", ""]
    for name in ("barcodes", "digits-stretch"):
        if name in learned:
            value = learned[name]["mean_log_rw_over_rh"]
            verdict = "yes" if value > 0 else "NO"
            lines.append(f"- {name}: maps wider than tall (mean log(r_w/r_h) > 0)? {verdict} ({value:+.3f})")
    if "digits-tile" in learned and "digits-large" in learned:
        areas = {k: math.prod(learned[k]["stage_sizes"][1]) for k in ("digits-tile", "digits-large")}
        verdict = "yes" if areas["digits-tile"] > areas["digits-large"] else "NO"
        lines.append(
            f"- first-stage map larger on digits-tile than on digits-large? {verdict} "
            f"({areas['digits-tile']} vs {areas['digits-large']} pixels)"
        )
    for name, r in learned.items():
        if name in human:
            h = human[name]
            acc = r["val_acc"] - h["val_acc"]
            cost = r["gmacs"] / h["gmacs"]
            lines.append(f"- {name}: DynOPool {acc:+.3f} accuracy at {cost:.2f}x the human-designed GMACs")
    return "\n".join(lines) + "\n"


def plot_sizes(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per data set: learned h and w of each stage against the human-designed sizes."""
    from .train.plot import _pyplot

    plt = _pyplot()
    datasets = [r["dataset"] for r in rows if r["model"] == "DynOPool"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.4), squeeze=False)
    for ax, name in zip(axes[0], datasets, strict=True):
        learned = next(r for r in rows if r["dataset"] == name and r["model"] == "DynOPool")
        human = next((r for r in rows if r["dataset"] == name and r["model"] != "DynOPool"), None)
        stages = range(len(learned["stage_sizes"]))
        ax.plot(stages, [s[0] for s in learned["stage_sizes"]], "-o", label="DynOPool h")
        ax.plot(stages, [s[1] for s in learned["stage_sizes"]], "-s", label="DynOPool w")
        if human is not None:
            ax.plot(stages, [s[0] for s in human["stage_sizes"]], ":", color="gray", label="human h = w")
        ax.set(title=f"{name}: acc {learned['val_acc']:.2f}", xlabel="stage", ylabel="size (pixels)")
        ax.set_xticks(list(stages))
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write results.md, results.json and sizes.png."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/experiment")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=None, help="at most this many steps per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha-lr", type=float, default=0.02)
    parser.add_argument("--lam-share", type=float, default=0.3, help="lambda * initial GMACs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = []
    for dataset in args.datasets:
        for learn in (True, False):
            row = run_one(dataset, learn, args)
            rows.append(row)
            print(
                f"{dataset:15s} {row['model']:15s} acc {row['val_acc']:.3f} GMACs {row['gmacs']:.5f} "
                f"sizes {_fmt_sizes(row['stage_sizes'])} ({row['seconds']} s)",
                flush=True,
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    table = write_table(rows, args)
    (out / "results.md").write_text(table)
    plot_sizes(rows, out / "sizes.png")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
