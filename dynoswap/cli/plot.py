"""Stage sizes drawn as rectangles to scale, as in the paper's Fig. 1 and 4 (matplotlib, optional)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .common import CliError


def require_matplotlib() -> None:
    """Fail with one clear line when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise CliError("--plot needs matplotlib: pip install 'dynoswap[plot]'") from exc


def plot_stages(models: dict[str, Sequence[Sequence[int]]], path: Path, force: bool = False) -> Path:
    """Draw each model's stages as a row of W x H rectangles, one row per model, same scale.

    Args:
        models: Label → stage sizes [(h, w), ...].
        path: PNG file to write (see :func:`dynoswap.io.figures.save_figure`).
        force: Replace an existing dynoswap plot.

    Returns:
        The path written.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    gap = max((max(w for _, w in stages) for stages in models.values() if stages), default=1) * 0.15
    rows = list(models.items())
    heights = [max((h for h, _ in stages), default=1) for _, stages in rows]
    widths = [sum(w for _, w in stages) + gap * max(len(stages) - 1, 0) for _, stages in rows]
    fig_w = max(widths, default=1)
    fig_h = sum(heights) + gap * (len(rows) + 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 10.0), max(2.0, 10.0 * fig_h / fig_w)))
    y = fig_h - gap
    for (label, stages), height in zip(rows, heights, strict=True):
        x = 0.0
        top = y
        for h, w in stages:
            ax.add_patch(Rectangle((x, top - h), w, h, fill=True, alpha=0.35, edgecolor="black"))
            ax.text(x + w / 2, top - h - gap * 0.1, f"{h}x{w}", ha="center", va="top", fontsize=7)
            x += w + gap
        ax.text(0, top + gap * 0.1, label, ha="left", va="bottom", fontsize=9)
        y -= height + gap
    ax.set_xlim(-gap * 0.5, fig_w + gap * 0.5)
    ax.set_ylim(0, fig_h + gap * 0.5)
    ax.set_aspect("equal")
    ax.axis("off")
    from ..io.figures import save_figure

    try:
        return save_figure(fig, path, force, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
