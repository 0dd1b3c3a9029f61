"""Plot files as outputs: PNG only, marked as dynoswap's, written through :func:`replace_output`.

A ``--plot`` file is an output like a saved model: locked, crash-safe, and an existing
file is replaced only with ``force`` and only when it carries dynoswap's mark, a PNG
text chunk with the key :data:`MARK_KEY`. A photo or any other file at the name is
never overwritten, and a link at the name is never followed.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from ..errors import OptionError
from .output import check_output, register_output_kind, replace_output

#: The output kind of a plot file.
PLOT = "plot"
#: The one image format plots are written in (its mark can be read back).
SUFFIX = ".png"
#: Key of the PNG text chunk that marks a plot as dynoswap's.
MARK_KEY = "dynoswap"
MARK_VALUE = "plot"
_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Chunks read before giving up on finding the mark (matplotlib writes text chunks before the image data).
_MAX_CHUNKS = 64


def is_own_plot(path: Path) -> bool:
    """Whether ``path`` is a plain PNG file carrying dynoswap's text chunk (reads only chunk headers)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            if fh.read(8) != _SIGNATURE:
                return False
            for _ in range(_MAX_CHUNKS):
                header = fh.read(8)
                if len(header) < 8:
                    return False
                length, kind = struct.unpack(">I4s", header)
                if kind in (b"IDAT", b"IEND"):
                    return False
                if kind == b"tEXt" and length <= 1024:
                    key, _, value = fh.read(length).partition(b"\0")
                    if key == MARK_KEY.encode() and value == MARK_VALUE.encode():
                        return True
                    fh.seek(4, os.SEEK_CUR)
                else:
                    fh.seek(length + 4, os.SEEK_CUR)
    except OSError:
        return False
    return False


register_output_kind(PLOT, is_own_plot)


def check_plot_path(path: str | os.PathLike[str], force: bool = False) -> Path:
    """Refuse a plot path before any work: not ``.png``, or occupied by something ``force`` may not replace.

    Raises:
        OptionError: The name does not end in ``.png``.
        OutputExistsError: A file is there (without ``force``), or one that is not a dynoswap plot.
    """
    target = Path(path)
    if target.suffix.lower() != SUFFIX:
        raise OptionError(f"plot file {target} must end in {SUFFIX} (plots are written as PNG)")
    return check_output(target, PLOT, force)


def save_figure(fig: Any, path: str | os.PathLike[str], force: bool = False, **savefig: Any) -> Path:
    """Write a matplotlib figure to ``path`` as a marked PNG, locked and crash-safe.

    Args:
        fig: The figure.
        path: A ``.png`` file.
        force: Replace an existing dynoswap plot.
        **savefig: More arguments for ``Figure.savefig`` (dpi, bbox_inches).

    Returns:
        The path written.
    """
    target = check_plot_path(path, force)
    with replace_output(target, PLOT, force) as work:
        fig.savefig(work, format="png", metadata={MARK_KEY: MARK_VALUE}, **savefig)
    return target
