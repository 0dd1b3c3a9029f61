"""The typer app: commands come from a registry of modules, each exposing ``register(app)``."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import typer
from typer.core import TyperGroup

from .common import join_size_arguments

# Command modules under dynoswap.cli; a module that is not there (yet) is skipped.
COMMANDS: tuple[str, ...] = ("convert", "inspect", "list", "train", "export", "profile", "paper")


def _version(value: bool) -> None:
    if value:
        from ..version import __version__

        typer.echo(f"dynoswap {__version__}")
        raise typer.Exit()


class _Group(TyperGroup):
    """The root command: ``--input-size`` may take 1, 2 or 3 numbers (see ``join_size_arguments``)."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:  # noqa: D102
        given = list(sys.argv[1:] if args is None else args)
        return super().main(join_size_arguments(given), *rest, **kwargs)


def build_app(commands: tuple[str, ...] = COMMANDS) -> typer.Typer:
    """Create the app and register each command module that exists.

    Only a missing command module itself is skipped; an ImportError raised inside
    one (a broken dependency) propagates.
    """
    app = typer.Typer(
        name="dynoswap",
        cls=_Group,
        help="Put DynOPool's learnable resizing into torchvision and timm CNNs.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    @app.callback()
    def _root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    ) -> None:
        """Put DynOPool's learnable resizing into torchvision and timm CNNs."""

    for name in commands:
        module_name = f"{__package__}.{name}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(app)
    return app


app = build_app()


def main() -> None:
    """Console entry point (``dynoswap``)."""
    app()
