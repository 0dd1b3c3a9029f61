"""Command-line interface: ``dynoswap convert | inspect | list | train``."""

from .app import COMMANDS, app, build_app, main

__all__ = ["COMMANDS", "app", "build_app", "main"]
