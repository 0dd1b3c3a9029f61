"""Training curves: DynOPool output sizes per epoch, accuracy and GMACs (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import MissingExtraError


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # optional extra
        raise MissingExtraError(
            "plots need matplotlib: pip install 'dynoswap[plot]' (or pip install matplotlib)"
        ) from err
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_history(
    records: list[dict[str, Any]], path: str | Path, title: str | None = None, force: bool = False
) -> Path:
    """Save a three-panel figure of a run's epoch records (``log.jsonl`` lines).

    Left: height (solid) and width (dashed) of each tie group's output, one colour per
    group (numbered from 1 in execution order, as in the tables) from the sizes before training (epoch 0) on; dotted
    horizontal lines mark the original model's sizes. Middle: train_acc and val_acc.
    Right: the real cost (GMACs, or ms with a latency cost) per epoch, against the target when the
    run had one, and lambda per step when one was given.

    Args:
        records: Epoch records as written by ``fit``.
        path: Output PNG file (see :func:`dynoswap.io.figures.save_figure`).
        title: Figure title.
        force: Replace an existing dynoswap plot.

    Returns:
        The written path.
    """
    from .loop import group_sizes

    if not records:
        raise ValueError("no epoch records to plot: train for at least one epoch")
    plt = _pyplot()
    initial = records[0].get("initial_pools") if records[0]["epoch"] == 1 else None
    history = ([(0, initial)] if initial else []) + [(r["epoch"], r["pools"]) for r in records]
    epochs = [e for e, _ in history]
    fig, (ax_size, ax_acc, ax_gmacs) = plt.subplots(1, 3, figsize=(15, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups = [g for g, _ in group_sizes(records[-1]["pools"])]
    originals = dict(group_sizes(records[-1]["pools"], key="original"))
    for i, group in enumerate(groups):
        colour = colours[i % len(colours)]
        sizes = [dict(group_sizes(pools)).get(group) for _, pools in history]
        label = f"{i + 1}: {group}"  # tie groups are numbered from 1 in execution order, as in every table
        ax_size.plot(epochs, [s[0] if s else None for s in sizes], "-o", color=colour, ms=3, label=label)
        ax_size.plot(epochs, [s[1] if s else None for s in sizes], "--s", color=colour, ms=3)
        original = originals.get(group)
        if original:
            ax_size.axhline(original[0], color=colour, ls=":", lw=0.8)
            if original[1] != original[0]:
                ax_size.axhline(original[1], color=colour, ls=":", lw=0.8)
    ax_size.set(
        xlabel="epoch (0: before training)",
        ylabel="output size (pixels)",
        title="sizes per tie group: h solid, w dashed, original dotted",
    )
    ax_size.legend(fontsize=7, loc="best")
    train_epochs = [r["epoch"] for r in records]
    ax_acc.plot(train_epochs, [r["train_acc"] for r in records], "-o", color="tab:blue", ms=3, label="train_acc")
    if "val_acc" in records[-1]:
        ax_acc.plot(train_epochs, [r.get("val_acc") for r in records], "-s", color="tab:green", ms=3, label="val_acc")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend(fontsize=8)
    unit = records[-1].get("cost_unit", "GMACs")
    ax_gmacs.plot(train_epochs, [r["gmacs"] for r in records], "-o", color="tab:red", ms=3, label=unit)
    target = records[-1].get("target_gmacs")
    if target:
        ax_gmacs.axhline(target, color="black", ls="--", lw=1, label=f"target {target:.4g}")
        ax_gmacs.axhspan(target * 0.97, target * 1.03, color="grey", alpha=0.15, label="target +-3%")
    ax_gmacs.set(xlabel="epoch", ylabel=unit, title=f"real cost ({unit})" + (" against the target" if target else ""))
    ax_gmacs.legend(fontsize=8, loc="upper left")
    steps = [lam for r in records for lam in r.get("lambda_steps", [])]
    if any(steps):  # a lambda was given: its weight per step (a budget alone is projected, with no lambda)
        ax_lam = ax_gmacs.twinx()
        per_step = [i / max(len(steps), 1) * train_epochs[-1] for i in range(1, len(steps) + 1)]
        ax_lam.plot(per_step, steps, color="tab:purple", lw=0.7, alpha=0.6)
        ax_lam.set_ylabel("lambda per step", color="tab:purple")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_size, ax_acc, ax_gmacs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    from ..io.figures import save_figure

    try:
        return save_figure(fig, path, force, dpi=110)
    finally:
        plt.close(fig)
