"""Text for tables that must fit a terminal: long names shortened in the middle, never at the end.

A DynOPool or node name is told apart by its end (``layer2.0.downsample.0`` against
``layer2.0.conv1``), so a name too long for its column keeps its start and its end and loses
the middle: ``layer2…sample.0``. Output to a pipe or a file has no width at all: one record per
line, whatever its length. Light: imports rich only.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text

ELLIPSIS = "…"
#: The ending of every DynOPool name that convert inserts (``NODE_dynopool``).
DYNOPOOL_SUFFIX = "_dynopool"
#: A name column never gets narrower than this (or the name's own length).
MIN_NAME_WIDTH = 12
#: Width of output written to a pipe or a file: no limit in practice, so nothing wraps (one record per
#: line, for grep) and tables take their natural width.
PIPE_WIDTH = 100_000


def make_console(file: IO[str] | None = None) -> Console:
    """Return a console on ``file`` (default: stdout at this moment) that fits where it writes.

    A terminal gets its own width; a pipe or a file gets :data:`PIPE_WIDTH`, so a line is never
    broken; ``COLUMNS`` in the environment wins over both.
    """
    file = file if file is not None else sys.stdout
    width = None if file.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH
    return Console(file=file, highlight=False, soft_wrap=False, width=width)


def visible(text: object) -> str:
    r"""Return ``text`` with control characters shown as escapes (``\x1b``, ``\n``): names never drive a terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))


def shorten_middle(text: str, width: int, suffix: str = "") -> str:
    """Return ``text`` in at most ``width`` characters: its start, ``…``, and its (longer) end.

    Args:
        text: The name.
        width: Characters available.
        suffix: An ending every name of the column shares (``_dynopool``): kept whole while the
            rest still gets room, so the shortening falls in the part that tells names apart.

    >>> shorten_middle("layer2.0.downsample.0", 15)
    'layer2…sample.0'
    >>> shorten_middle("layer2.0.downsample.0_dynopool", 20, "_dynopool")
    'laye…mple.0_dynopool'
    """
    if len(text) <= width:
        return text
    if suffix and text.endswith(suffix) and width - len(suffix) >= 8:
        return shorten_middle(text[: -len(suffix)], width - len(suffix)) + suffix
    if width <= 1:
        return ELLIPSIS[:width]
    keep = width - 1
    head = (keep - 1) // 2
    return text[:head] + ELLIPSIS + text[len(text) - (keep - head) :]


class Name:
    """A table cell holding a name: full where it fits, shortened in the middle where it does not.

    Args:
        text: The name (shown literally: markup is not interpreted, control characters are escaped).
        style: Rich style of the text.
        min_width: Narrowest the column may get for this name.
        suffix: An ending kept whole while there is room (see :func:`shorten_middle`).
    """

    def __init__(self, text: object, style: str = "", min_width: int = MIN_NAME_WIDTH, suffix: str = "") -> None:
        self.text = visible(text)
        self.style = style
        self.min_width = min_width
        self.suffix = suffix

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(len(self.text), self.min_width), len(self.text))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        short = shorten_middle(self.text, options.max_width, self.suffix)
        yield Text(short, style=self.style, no_wrap=True, overflow="ignore")

    def __str__(self) -> str:
        return self.text
