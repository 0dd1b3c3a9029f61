"""``make experiment``: accuracy against real cost, three designs at equal cost (paper Figure 5, on CPU).

Three designs of the same small VGG (``vgg-tiny``: three 2x2 pooling stages) are compared at equal
real cost, several budgets and seeds, mean +- std:

- **human**: the human-designed model fed images resized to ``factor`` x the data's resolution
  (the paper's knob for the human model in Figure 5);
- **symmetric**: full-resolution input, every pooling a fixed symmetric scale, one common scale
  chosen so the model costs the budget (the alphas are projected onto it and never learned);
- **dynopool**: full-resolution input, the scales learned on the budget (``target_gmacs``).

The budget at each factor is the human model's cost. One cost convention holds for all three:
each is costed as the converted model it really runs, at its own input size, by ``count_gmacs``
(fvcore), so every pooling layer counts 16 MACs per output cell whether it is learned or not (the
human model's pools are DynOPools held at r = 0.5 on even sizes, which compute exactly 2x2 max
pooling; the run checks it).

Writes ``tradeoff.md``, ``tradeoff.json`` and ``tradeoff.png`` to ``--out``::

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

from .train.protocol import ALPHA_LR, BUDGET_ANNEAL

MODEL = "vgg-tiny"  # the zoo entry: saved runs name no code
DESIGNS = ("human", "symmetric", "dynopool")
LABELS = {
    "human": "human-designed, resized input",
    "symmetric": "full resolution, fixed symmetric pooling",
    "dynopool": "DynOPool, learned scales",
}
#: The data sets of the default study, and what each can show (written into the results).
STUDIES = {
    "barcodes-noisy": (
        "Class in one-pixel vertical bars (a cyclic code), every column constant up to heavy noise: the "
        "information lives at full horizontal resolution, the vertical axis only averages noise. Resizing "
        "the input merges bars; symmetric pooling spends the budget on height that carries nothing.",
        (0.5, 0.75, 1.0),
    ),
    "digits-stretch": (
        "8x8 digits upscaled 4x and stretched: shrinking the input loses almost nothing, so the human "
        "model's knob is free. It can show that learning the sizes no longer costs accuracy, not that it "
        "gains any.",
        (1.0,),
    ),
}


def _convert(input_size: tuple[int, int], num_classes: int, seed: int):
    from .engine import convert
    from .models import ModelSource

    torch.manual_seed(seed)
    source = ModelSource("dynoswap", MODEL, {"num_classes": num_classes})
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


class Resized(torch.utils.data.Dataset):
    """A data set's images resized (bilinear, antialiased) to ``size``: the human model's input resolution."""

    def __init__(self, base: Any, size: tuple[int, int]) -> None:
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        import torch.nn.functional as F

        image, label = self.base[index]
        image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
        return image, label


def human_size(full: tuple[int, int], factor: float) -> tuple[int, int]:
    """Return the human model's input at ``factor``: a multiple of 8, so all three poolings see even sizes."""
    return (max(8, 8 * round(full[0] * factor / 8)), max(8, 8 * round(full[1] * factor / 8)))


def run_point(dataset: str, design: str, factor: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one design at one budget and seed; return its row (accuracy, real cost, learned sizes)."""
    from .cost import count_gmacs, stage_sizes
    from .train import fit, load_data, make_loaders
    from .train.data import DataBundle

    bundle = load_data(dataset, seed=seed)
    if len(bundle.input_size) != 2:
        raise ValueError(f"the study compares 2-D image designs; {dataset} is {len(bundle.input_size)}-D")
    full = (bundle.input_size[0], bundle.input_size[1])
    small = human_size(full, factor)
    human_original, human_gm = _convert(small, bundle.num_classes, seed)
    _check_same_as_maxpool(human_original, human_gm, small)
    budget = count_gmacs(human_gm, small).total
    if design == "human":
        used = DataBundle(
            bundle.name, Resized(bundle.train, small), Resized(bundle.val, small), bundle.num_classes, small
        )
        gm = human_gm
    else:
        used = bundle
        _, gm = _convert(full, bundle.num_classes, seed)
    torch.manual_seed(seed)
    train, val = make_loaders(used, args.batch_size, seed=seed)
    started = time.perf_counter()
    learn = design == "dynopool"
    retrain = learn and getattr(args, "retrain", False)
    records = fit(
        gm,
        train,
        val,
        # A retrained DynOPool searches for as many epochs as it then trains: its final weights see the
        # same schedule as the baselines'.
        epochs=args.epochs * 2 if retrain else args.epochs,
        lr=args.lr,
        alpha_lr=args.alpha_lr if learn else 0.0,
        input_size=used.input_size,
        progress=False,
        target_gmacs=None if design == "human" else budget,
        retrain=retrain,
        budget_anneal=args.budget_anneal,
    )
    gmacs = count_gmacs(gm, used.input_size).total
    return {
        "dataset": dataset,
        "design": design,
        "factor": factor,
        "seed": seed,
        "input_size": list(used.input_size),
        "target_gmacs": budget,
        "gmacs": float(gmacs),
        "val_acc": records[-1]["val_acc"],
        "first_val_acc": records[0]["val_acc"],
        "stage_sizes": [list(x) for x in stage_sizes(gm, used.input_size)],
        "seconds": round(time.perf_counter() - started, 1),
        "history": [{"epoch": r["epoch"], "val_acc": r["val_acc"], "gmacs": r["gmacs"]} for r in records],
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(var)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (data set, design, factor)."""
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for design in DESIGNS:
            for factor in sorted({r["factor"] for r in rows if r["dataset"] == dataset}):
                group = [r for r in rows if (r["dataset"], r["design"], r["factor"]) == (dataset, design, factor)]
                if not group:
                    continue
                acc, acc_sd = mean_std([r["val_acc"] for r in group])
                gmacs, gmacs_sd = mean_std([r["gmacs"] for r in group])
                out.append(
                    {
                        "dataset": dataset,
                        "design": design,
                        "factor": factor,
                        "seeds": len(group),
                        "val_acc": acc,
                        "val_acc_std": acc_sd,
                        "val_accs": [r["val_acc"] for r in group],
                        "gmacs": gmacs,
                        "gmacs_std": gmacs_sd,
                        "target_gmacs": group[0]["target_gmacs"],
                        "largest_miss": max(abs(r["gmacs"] / r["target_gmacs"] - 1) for r in group),
                        "input_size": group[0]["input_size"],
                        "stage_sizes": [r["stage_sizes"] for r in group],
                        "seconds": sum(r["seconds"] for r in group) / len(group),
                    }
                )
    return out


def _fmt_sizes(sizes: list[list[int]]) -> str:
    return " ".join(f"{h}x{w}" for h, w in sizes[1:])


def verdicts(summary: list[dict[str, Any]]) -> list[str]:
    """One line per (data set, budget): DynOPool against each baseline, with the combined std."""
    lines = []
    by_key = {(r["dataset"], r["design"], r["factor"]): r for r in summary}
    for r in summary:
        if r["design"] != "dynopool":
            continue
        parts = []
        for other in ("human", "symmetric"):
            o = by_key.get((r["dataset"], other, r["factor"]))
            if o is None:
                continue
            diff = r["val_acc"] - o["val_acc"]
            noise = math.hypot(r["val_acc_std"], o["val_acc_std"])
            word = "ahead" if diff > noise else ("behind" if -diff > noise else "within noise")
            parts.append(f"{diff * 100:+.1f} points vs {other} ({word}, combined std {noise * 100:.1f})")
        lines.append(f"- {r['dataset']} at {r['target_gmacs']:.5f} GMACs (factor {r['factor']:g}): " + "; ".join(parts))
    return lines


def write_markdown(summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """Write the results page: set-up, one table per data set, verdicts."""
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        "# Accuracy against real cost: three designs at equal cost",
        "",
        f"Small VGG (`{MODEL}`: widths 16-32-64-64, three pooling stages), CPU, {args.epochs} epochs, batch "
        f"{args.batch_size}, SGD momentum 0.9, cosine annealing, lr {args.lr}, alpha lr {args.alpha_lr} (the "
        f"typical relative change of an alpha per step), seeds {seeds}; mean +- std over seeds. Training "
        "protocol (`dynoswap.fit` defaults): alphas held for the first 10% of the steps, learned on the budget "
        "until 50%, then landed on integer sizes that the weights train on for the rest. The budget moves "
        f"log-linearly from the converted model's own cost to the target over the first {args.budget_anneal:.0%} "
        "of the steps (budget annealing), so cells are taken away while the weights use them."
        + (
            f" With --retrain, DynOPool runs {2 * args.epochs} epochs: the landing at half-way restores its "
            f"starting weights, which then train {args.epochs} epochs at the learned sizes."
            if getattr(args, "retrain", False)
            else ""
        ),
        "",
        "Cost convention: every design is costed as the model it runs, at its own input size, by "
        "`count_gmacs` (fvcore; a pooling layer counts 16 MACs per output cell for all three, and the "
        "human model's pools are DynOPools at r = 0.5, exactly 2x2 max pooling, checked). Each budget is "
        "the human model's cost at that input factor.",
        "",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in summary):
        lines += [f"## {dataset}", "", STUDIES.get(dataset, ("", ()))[0], ""]
        lines += [
            "| budget GMACs (factor) | design | input | val acc | per seed | real GMACs (largest miss) | "
            "stage sizes after the stem, h x w (per seed) |",
            "|---|---|---|---:|---|---|---|",
        ]
        for r in summary:
            if r["dataset"] != dataset:
                continue
            seeds_acc = " / ".join(f"{v:.3f}" for v in r["val_accs"])
            sizes = "; ".join(_fmt_sizes(s) for s in r["stage_sizes"])
            lines.append(
                f"| {r['target_gmacs']:.5f} ({r['factor']:g}) | {r['design']} | "
                f"{r['input_size'][0]}x{r['input_size'][1]} | {r['val_acc']:.3f} +- {r['val_acc_std']:.3f} | "
                f"{seeds_acc} | {r['gmacs']:.5f} ({r['largest_miss']:.1%}) | {sizes} |"
            )
        lines.append("")
    lines += ["## At equal cost", "", *verdicts(summary), ""]
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], path: Path, dataset: str) -> None:
    """Accuracy against real GMACs on ``dataset``: one curve per design, error bars one std over seeds."""
    from .train.plot import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.8, 4))
    for design, style in zip(DESIGNS, ("s--", "^:", "o-"), strict=True):
        rows = sorted(
            (r for r in summary if r["design"] == design and r["dataset"] == dataset), key=lambda r: r["gmacs"]
        )
        if rows:
            ax.errorbar(
                [r["gmacs"] for r in rows],
                [r["val_acc"] for r in rows],
                xerr=[r["gmacs_std"] for r in rows],
                yerr=[r["val_acc_std"] for r in rows],
                fmt=style,
                capsize=3,
                label=LABELS[design],
            )
    ax.set(xlabel="real GMACs (count_gmacs)", ylabel="validation accuracy", title=f"accuracy vs cost on {dataset}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run every (data set, design, budget, seed); write tradeoff.{md,json,png}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/experiment")
    parser.add_argument("--datasets", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--alpha-lr", type=float, default=ALPHA_LR)
    parser.add_argument("--budget-anneal", type=float, default=BUDGET_ANNEAL)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="DynOPool searches for --epochs, then retrains the learned sizes from its starting weights for --epochs",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = []
    for dataset in args.datasets:
        for factor in STUDIES[dataset][1]:
            for seed in args.seeds:
                for design in DESIGNS if len(STUDIES[dataset][1]) > 1 else ("human", "dynopool"):
                    row = run_point(dataset, design, factor, seed, args)
                    rows.append(row)
                    print(
                        f"{dataset} factor {factor:g} seed {seed} {design:9s} acc {row['val_acc']:.3f} GMACs "
                        f"{row['gmacs']:.5f} (target {row['target_gmacs']:.5f}) sizes "
                        f"{_fmt_sizes(row['stage_sizes'])} ({row['seconds']} s)",
                        flush=True,
                    )
    summary = summarize(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tradeoff.json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=1) + "\n"
    )
    page = write_markdown(summary, args)
    (out / "tradeoff.md").write_text(page)
    plot(summary, out / "tradeoff.png", args.datasets[0])
    print(page)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
