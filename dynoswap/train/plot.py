"""Training curves: DynOPool output sizes per epoch, accuracy and GMACs (matplotlib, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:  # optional extra
        raise ImportError("plots need matplotlib: pip install 'dynoswap[plot]' (or pip install matplotlib)") from err
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_history(records: list[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Save a two-panel figure of a run's epoch records (``log.jsonl`` lines).

    Left: height (solid) and width (dashed) of each DynOPool's output, one colour per
    layer. Right: accuracy (validation when logged, else training) and GMACs.

    Args:
        records: Epoch records as written by ``fit``.
        path: Output image file (``.png``, ``.svg``, ...).
        title: Figure title.

    Returns:
        The written path.
    """
    if not records:
        raise ValueError("no epoch records to plot: train for at least one epoch")
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (ax_size, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    names = [p["name"] for p in records[-1]["pools"]]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, name in enumerate(names):
        rows = [{p["name"]: p for p in r["pools"]}.get(name) for r in records]
        colour = colours[i % len(colours)]
        ax_size.plot(epochs, [p["out"][0] if p else None for p in rows], "-o", color=colour, ms=3, label=f"{name} h")
        ax_size.plot(epochs, [p["out"][1] if p else None for p in rows], "--s", color=colour, ms=3, label=f"{name} w")
    ax_size.set(xlabel="epoch", ylabel="output size (pixels)", title="DynOPool sizes: h solid, w dashed")
    ax_size.legend(fontsize=7, ncol=2)
    key = "val_acc" if "val_acc" in records[-1] else "train_acc"
    ax_acc.plot(epochs, [r[key] for r in records], "-o", color="tab:blue", ms=3)
    ax_acc.set(xlabel="epoch", ylabel=key.replace("_", " "), title="accuracy and GMACs")
    ax_gmacs = ax_acc.twinx()
    ax_gmacs.plot(epochs, [r["gmacs"] for r in records], "--s", color="tab:red", ms=3)
    ax_gmacs.set_ylabel("GMACs", color="tab:red")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
