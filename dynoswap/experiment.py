"""``make experiment``: a Figure-5-style trade-off study and the paper's section-3 comparison, on CPU.

Trade-off (``tradeoff.md``, ``tradeoff.json``, ``tradeoff.png``): on one built-in data set,
the human-designed small VGG at several input resolutions against DynOPool trained at full
resolution with ``--target-gmacs`` set to the human model's GMACs at each resolution, several
seeds, mean +- std: accuracy at equal cost.

Section 3:
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
MODEL = "vgg-tiny"  # the zoo entry: saved runs name no code


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


# -- Figure-5-style trade-off study --------------------------------------------------------------
class _Resized(torch.utils.data.Dataset):
    """A data set's images resized (bilinear) to ``size``: the human-designed model's input resolution knob."""

    def __init__(self, base: Any, size: tuple[int, int]) -> None:
        self.base, self.size = base, size

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        import torch.nn.functional as F

        image, label = self.base[index]
        image = F.interpolate(image[None], size=self.size, mode="bilinear", align_corners=False)[0]
        return image, label


def run_tradeoff_one(dataset: str, mode: str, factor: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one point of the trade-off and return its row.

    The human-designed model sees images resized to ``factor`` x the input resolution; DynOPool
    sees full-resolution images and trains to the human model's GMACs at that factor.
    """
    from .cost import count_gmacs, stage_sizes
    from .train import fit, load_data, make_loaders
    from .train.data import DataBundle

    bundle = load_data(dataset, seed=seed)
    full = bundle.input_size
    scaled = (max(8, round(full[0] * factor)), max(8, round(full[1] * factor)))
    human_bundle = DataBundle(
        bundle.name, _Resized(bundle.train, scaled), _Resized(bundle.val, scaled), bundle.num_classes, scaled
    )
    human_original, _ = _convert(scaled, bundle.num_classes, seed)
    budget = count_gmacs(human_original, scaled).total  # the human-designed model as built: max pools
    learn = mode == "DynOPool"
    used = bundle if learn else human_bundle
    original, gm = _convert(used.input_size, bundle.num_classes, seed)
    torch.manual_seed(seed)
    train, val = make_loaders(used, args.batch_size, seed=seed)
    started = time.perf_counter()
    records = fit(
        gm,
        train,
        val,
        epochs=args.epochs,
        lr=args.lr,
        alpha_lr=args.alpha_lr if learn else 0.0,
        max_steps=args.max_steps,
        input_size=used.input_size,
        out=None,
        progress=False,
        target_gmacs=budget if learn else None,
    )
    gmacs = count_gmacs(gm if learn else original, used.input_size).total
    return {
        "dataset": dataset,
        "model": mode,
        "factor": factor,
        "seed": seed,
        "input_size": list(used.input_size),
        "target_gmacs": budget,
        "gmacs": float(gmacs),
        "val_acc": records[-1]["val_acc"],
        "stage_sizes": [list(x) for x in stage_sizes(gm, used.input_size)],
        "seconds": round(time.perf_counter() - started, 1),
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(var)


def summarize_tradeoff(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds per (model, factor)."""
    out = []
    for mode in ("human-designed", "DynOPool"):
        for factor in sorted({r["factor"] for r in rows}):
            group = [r for r in rows if r["model"] == mode and r["factor"] == factor]
            if not group:
                continue
            acc, acc_sd = _mean_std([r["val_acc"] for r in group])
            gmacs, gmacs_sd = _mean_std([r["gmacs"] for r in group])
            out.append(
                {
                    "model": mode,
                    "factor": factor,
                    "seeds": len(group),
                    "val_acc": acc,
                    "val_acc_std": acc_sd,
                    "gmacs": gmacs,
                    "gmacs_std": gmacs_sd,
                    "target_gmacs": group[0]["target_gmacs"],
                    "input_size": group[0]["input_size"],
                    "stage_sizes": group[0]["stage_sizes"],
                    "seconds": sum(r["seconds"] for r in group) / len(group),
                }
            )
    return out


def write_tradeoff(summary: list[dict[str, Any]], dataset: str, args: argparse.Namespace) -> str:
    """Markdown table of the trade-off study and an honest verdict per budget."""
    seeds = ", ".join(str(s) for s in args.seeds)
    lines = [
        f"# Accuracy against GMACs on {dataset} (Figure-5 style)",
        "",
        f"Small VGG (vgg-tiny), CPU, {args.epochs} epochs"
        + (f" of at most {args.max_steps} steps" if args.max_steps else "")
        + f", batch {args.batch_size}, lr {args.lr}, seeds {seeds}; mean +- std over seeds. "
        "Human-designed: the model with its max pools, trained and evaluated on images resized to "
        "factor x the input resolution (the paper's knob for the human model). DynOPool: full resolution, "
        f"alpha lr {args.alpha_lr}, trained with `--target-gmacs` set to the human model's GMACs at the "
        "same factor, so each pair is compared at the same cost.",
        "",
        "| model | factor | input | GMACs (target) | val acc | stage sizes (seed 0) | s/run |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    for r in summary:
        lines.append(
            f"| {r['model']} | {r['factor']:g} | {r['input_size'][0]}x{r['input_size'][1]} | "
            f"{r['gmacs']:.5f} +- {r['gmacs_std']:.5f} ({r['target_gmacs']:.5f}) | "
            f"{r['val_acc']:.3f} +- {r['val_acc_std']:.3f} | {_fmt_sizes(r['stage_sizes'])} | {r['seconds']:.0f} |"
        )
    lines += ["", "## At equal cost", ""]
    human = {r["factor"]: r for r in summary if r["model"] == "human-designed"}
    for r in summary:
        if r["model"] != "DynOPool" or r["factor"] not in human:
            continue
        h = human[r["factor"]]
        diff = r["val_acc"] - h["val_acc"]
        noise = math.hypot(r["val_acc_std"], h["val_acc_std"])
        verdict = "DynOPool better" if diff > noise else ("human better" if -diff > noise else "within noise")
        lines.append(
            f"- {h['target_gmacs']:.5f} GMACs (factor {r['factor']:g}): DynOPool {r['val_acc']:.3f} vs human "
            f"{h['val_acc']:.3f} ({diff:+.3f}, combined std {noise:.3f}): {verdict}; DynOPool's GMACs "
            f"{r['gmacs'] / r['target_gmacs'] - 1:+.1%} off the target"
        )
    return "\n".join(lines) + "\n"


def plot_tradeoff(summary: list[dict[str, Any]], path: Path, dataset: str) -> None:
    """Accuracy against GMACs: one curve per model, error bars one std over seeds."""
    from .train.plot import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for mode, style in (("human-designed", "s--"), ("DynOPool", "o-")):
        rows = sorted((r for r in summary if r["model"] == mode), key=lambda r: r["gmacs"])
        if rows:
            ax.errorbar(
                [r["gmacs"] for r in rows],
                [r["val_acc"] for r in rows],
                xerr=[r["gmacs_std"] for r in rows],
                yerr=[r["val_acc_std"] for r in rows],
                fmt=style,
                capsize=3,
                label=mode + (" (input resolution)" if mode != "DynOPool" else " (--target-gmacs)"),
            )
    ax.set(xlabel="GMACs", ylabel="validation accuracy", title=f"accuracy vs GMACs on {dataset}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_tradeoff(args: argparse.Namespace, out: Path) -> None:
    """Run every (model, factor, seed) of the trade-off study; write tradeoff.{md,json,png}."""
    rows = []
    for seed in args.seeds:
        for factor in args.factors:
            for mode in ("human-designed", "DynOPool"):
                row = run_tradeoff_one(args.tradeoff_dataset, mode, factor, seed, args)
                rows.append(row)
                print(
                    f"tradeoff seed {seed} factor {factor:g} {mode:15s} acc {row['val_acc']:.3f} "
                    f"GMACs {row['gmacs']:.5f} (target {row['target_gmacs']:.5f}) ({row['seconds']} s)",
                    flush=True,
                )
    summary = summarize_tradeoff(rows)
    out.mkdir(parents=True, exist_ok=True)
    data = {"args": vars(args), "rows": rows, "summary": summary}
    (out / "tradeoff.json").write_text(json.dumps(data, indent=1) + "\n")
    table = write_tradeoff(summary, args.tradeoff_dataset, args)
    (out / "tradeoff.md").write_text(table)
    plot_tradeoff(summary, out / "tradeoff.png", args.tradeoff_dataset)
    print(table)


# -- budget against a hand-tuned lambda ---------------------------------------------------------------
def run_budget_vs_lambda(args: argparse.Namespace, out: Path) -> None:
    """DynOPool with a fixed lambda, then with ``--target-gmacs`` set to the cost that lambda reached.

    Same data, epochs and seeds: does training to a budget give up accuracy against a lambda that
    happens to land on the same cost? Writes ``budget_vs_lambda.{md,json}``.
    """
    from .cost import count_gmacs, gmacs_loss
    from .train import fit, load_data, make_loaders

    rows = []
    for seed in args.seeds:
        bundle = load_data(args.tradeoff_dataset, seed=seed)
        row: dict[str, Any] = {"seed": seed}
        target = None
        for mode in ("lambda", "target"):
            _, gm = _convert(bundle.input_size, bundle.num_classes, seed)
            g0 = float(gmacs_loss(gm).detach())
            torch.manual_seed(seed)
            train, val = make_loaders(bundle, args.batch_size, seed=seed)
            records = fit(
                gm, train, val, epochs=args.epochs, lam=args.lam_share / g0 if mode == "lambda" else 0.0,
                lr=args.lr, alpha_lr=args.alpha_lr, max_steps=args.max_steps, input_size=bundle.input_size,
                progress=False, target_gmacs=target if mode == "target" else None,
            )  # fmt: skip
            gmacs = count_gmacs(gm, bundle.input_size).total
            row[mode] = {"val_acc": records[-1]["val_acc"], "gmacs": gmacs}
            target = gmacs
        rows.append(row)
        print(f"budget-vs-lambda seed {seed}: {row}", flush=True)
    acc_l = _mean_std([r["lambda"]["val_acc"] for r in rows])
    acc_t = _mean_std([r["target"]["val_acc"] for r in rows])
    miss = [r["target"]["gmacs"] / r["lambda"]["gmacs"] - 1 for r in rows]
    lines = [
        f"# Training to a budget against a hand-tuned lambda ({args.tradeoff_dataset})",
        "",
        f"Per seed: DynOPool with lambda = {args.lam_share} / initial GMACs, then DynOPool with `--target-gmacs` "
        f"set to the GMACs that run ended at; {args.epochs} epochs, seeds {', '.join(map(str, args.seeds))}.",
        "",
        "| seed | lambda: acc / GMACs | target: acc / GMACs | GMACs off the target |",
        "|---:|---|---|---:|",
    ]
    for r, m in zip(rows, miss, strict=True):
        lines.append(
            f"| {r['seed']} | {r['lambda']['val_acc']:.3f} / {r['lambda']['gmacs']:.5f} | "
            f"{r['target']['val_acc']:.3f} / {r['target']['gmacs']:.5f} | {m:+.1%} |"
        )
    lines += [
        "",
        f"Mean val acc: fixed lambda {acc_l[0]:.3f} +- {acc_l[1]:.3f}, target {acc_t[0]:.3f} +- {acc_t[1]:.3f}; "
        f"largest miss of the target {max(abs(m) for m in miss):.1%}.",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "budget_vs_lambda.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    (out / "budget_vs_lambda.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


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
    parser.add_argument(
        "--study",
        choices=("all", "section3", "tradeoff", "budget"),
        default="all",
        help="which study to run (default all three)",
    )
    parser.add_argument("--tradeoff-dataset", default="digits-stretch", choices=DATASETS)
    parser.add_argument(
        "--factors", type=float, nargs="+", default=[0.5, 0.625, 0.75, 1.0], help="input resolution factors"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.study in ("all", "tradeoff"):
        run_tradeoff(args, out)
    if args.study in ("all", "budget"):
        run_budget_vs_lambda(args, out)
    if args.study in ("tradeoff", "budget"):
        return 0
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
