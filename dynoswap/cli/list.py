"""``dynoswap list [PATTERN]``: model names from torchvision and timm, fnmatch-filtered."""

from __future__ import annotations

import sys

import typer

from .common import DebugOption, UsageError, err_console, handle_errors
from .render import safe

# CLI spelling of each library, as accepted by the model resolver.
SPELLING = {"torchvision": "tv:", "timm": "timm:", "dynoswap": ""}  # zoo names are typed bare


@handle_errors
def list_cmd(
    pattern: str | None = typer.Argument(None, help="fnmatch pattern, e.g. 'resnet*' (quote it in the shell)."),
    source: str | None = typer.Option(None, "--source", help="Only one library: tv or timm."),
    debug: bool = DebugOption,
) -> None:
    """List model names usable as MODEL (one per line, prefixed tv: or timm:)."""
    from ..models import ModelError, list_models

    try:
        rows = list_models(pattern, source)
    except ModelError as exc:
        raise UsageError(str(exc)) from exc
    if not rows:
        err_console().print(f"no model matches {safe(repr(pattern))}")
        raise typer.Exit(1)
    sys.stdout.write("".join(f"{SPELLING[library]}{name}\n" for library, name in rows))


def register(app: typer.Typer) -> None:
    """Add the ``list`` command."""
    app.command("list")(list_cmd)
