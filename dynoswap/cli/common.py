"""Shared CLI pieces: error handling (one-line errors, exit codes, --debug), consoles, option parsers.

Heavy libraries (torch, torchvision, timm) are imported inside functions so that
``dynoswap --help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import typer
from rich.console import Console

from ..display import make_console
from ..validate import MIN_OUTPUT_SIDE

if TYPE_CHECKING:
    from torch import nn

    from ..io.checkpoint import KeyMismatch
    from ..models import ModelSource

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
#: An exception dynoswap did not raise on purpose: a dynoswap bug (``EX_SOFTWARE`` of sysexits.h).
EXIT_INTERNAL = 70

#: Set to 1 to show full tracebacks, as ``--debug`` does.
DEBUG_ENV = "DYNOSWAP_DEBUG"

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """An error to report as one line, with an exit code (1: failure, 2: bad usage)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UsageError(CliError):
    """Bad command-line usage (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)


# -- consoles -----------------------------------------------------------------
def out_console() -> Console:
    """Console on stdout (:func:`dynoswap.display.make_console`), made per call: a swapped sys.stdout is honoured."""
    return make_console(sys.stdout)


def err_console() -> Console:
    """Console on stderr, for human text next to machine-readable stdout."""
    return make_console(sys.stderr)


def print_json(data: dict[str, Any]) -> None:
    """Write exactly one JSON object to stdout."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


# -- errors -------------------------------------------------------------------
def _mismatch_details(exc: BaseException, console: Console) -> None:
    from .render import mismatch_table

    console.print(mismatch_table(exc.mismatch))  # type: ignore[attr-defined]


def _details_registry() -> dict[type, Callable[[BaseException, Console], None]]:
    from ..io.checkpoint import KeyMismatchError

    return {KeyMismatchError: _mismatch_details}


def _exit_codes() -> dict[type, int]:
    """Map exception types to exit codes: the one table, most specific first (first match wins).

    Exit 2 is for the user's input only: the :mod:`dynoswap.errors` types that describe it. Other
    dynoswap errors are failures (1), as is an ``OSError`` (the system refused: permissions, a full
    disk). Any exception not in the table is a dynoswap bug (:data:`EXIT_INTERNAL`).
    """
    from .. import errors

    return {
        CliError: -1,  # carries its own code
        errors.UntrustedCodeError: EXIT_USAGE,
        errors.ModelError: EXIT_USAGE,
        errors.RecipeError: EXIT_USAGE,
        errors.PresetError: EXIT_USAGE,
        errors.DataError: EXIT_USAGE,
        errors.OptionError: EXIT_USAGE,
        errors.OutputExistsError: EXIT_USAGE,
        errors.FrozenSizeError: EXIT_USAGE,
        errors.ConversionError: EXIT_FAILURE,
        errors.CheckpointError: EXIT_FAILURE,
        errors.SaveError: EXIT_FAILURE,
        errors.TrainingError: EXIT_FAILURE,
        errors.ExportError: EXIT_FAILURE,
        errors.DynoswapError: EXIT_FAILURE,
        OSError: EXIT_FAILURE,
    }


def _hints() -> dict[type, Callable[[BaseException], str]]:
    """Map library exception types to what to type instead exception type (the library's messages never name flags)."""
    from .. import errors
    from ..io.checkpoint import KeyMismatchError

    return {
        KeyMismatchError: lambda exc: "pass --allow-missing to load what matches",
        errors.UntrustedCodeError: lambda exc: (
            "pass --trust-code only if you trust where it came from" if getattr(exc, "trustable", True) else ""
        ),
        errors.RunExistsError: lambda exc: "pass --resume to continue it or --force to start it over",
        errors.OutputLockedError: lambda exc: "",
        errors.OutputExistsError: lambda exc: (
            "pass --force to replace it" if getattr(exc, "replaceable", False) else "choose another path"
        ),
    }


def hint_of(exc: BaseException) -> str:
    """Return the command-line advice for an exception ('' when there is none)."""
    for kind, hint in _hints().items():
        if isinstance(exc, kind):
            return hint(exc)
    return ""


def exit_code_of(exc: BaseException) -> int:
    """Exit code for an exception, from :func:`_exit_codes`; anything else is a dynoswap bug (70)."""
    for kind, value in _exit_codes().items():
        if isinstance(exc, kind):
            return exc.exit_code if isinstance(exc, CliError) else value
    return EXIT_INTERNAL


def is_internal(exc: BaseException) -> bool:
    """Whether an exception is a dynoswap bug rather than an error dynoswap raised on purpose."""
    return exit_code_of(exc) == EXIT_INTERNAL


def debug_requested(flag: bool = False) -> bool:
    """Whether full tracebacks were asked for: ``--debug`` or ``DYNOSWAP_DEBUG=1``."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(exc: BaseException) -> str:
    """Return the exception's message on one line (its type name when it has none)."""
    from .render import visible

    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError):
        text = text.strip("'\"")
    return visible(text) or type(exc).__name__


def internal_error_line(exc: BaseException) -> str:
    """Return the one line of an internal error: what was raised, that it is a bug, how to report it."""
    return (
        f"internal error ({type(exc).__name__}: {one_line(exc)}): this is a dynoswap bug, not a problem with "
        f"your input; please report it with the command you ran and the traceback that --debug "
        f"(or {DEBUG_ENV}=1) shows"
    )


def report_error(exc: BaseException) -> int:
    """Print details (if any) and one error line on stderr; returns the exit code."""
    if is_internal(exc):
        sys.stderr.write(f"error: {internal_error_line(exc)}\n")
        sys.stderr.flush()
        return EXIT_INTERNAL
    console = err_console()
    try:
        registry = _details_registry()
    except ImportError:
        registry = {}
    for kind, show in registry.items():
        if isinstance(exc, kind):
            show(exc, console)
    hint = hint_of(exc)
    sys.stderr.write(f"error: {one_line(exc)}{'; ' + hint if hint else ''}\n")
    sys.stderr.flush()
    return exit_code_of(exc)


_default_showwarning = warnings.showwarning


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """Print dynoswap's own warnings as one ``warning:`` line; others as Python prints them."""
    if f"{os.sep}dynoswap{os.sep}" in filename:
        from .render import visible

        sys.stderr.write(f"warning: {visible(' '.join(str(message).split()))}\n")
        return
    _default_showwarning(message, category, filename, lineno, file, line)


def handle_errors(fn: F) -> F:
    """Turn exceptions of a command into one stderr line and an exit code.

    The command's ``debug`` keyword argument (the ``--debug`` flag) or ``DYNOSWAP_DEBUG=1``
    re-raises instead, so the full traceback shows. An exception dynoswap did not raise on
    purpose exits :data:`EXIT_INTERNAL` with a line saying it is a bug.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except (typer.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as exc:
            sys.stderr.write("error: interrupted\n")
            raise typer.Exit(130) from exc
        except Exception as exc:
            if debug_requested(bool(kwargs.get("debug"))):
                raise
            raise typer.Exit(report_error(exc)) from exc

    return wrapper  # type: ignore[return-value]


# -- shared options -----------------------------------------------------------
DebugOption = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors.")
JsonOption = typer.Option(False, "--json", help="Print exactly one JSON object on stdout.")
NumClassesOption = typer.Option(None, "--num-classes", min=1, help="Classifier size of the built model.")
ModelKwargsOption = typer.Option(
    None, "--model-kwargs", metavar="KEY=VALUE", help="Builder keyword argument (repeatable); values are YAML."
)
WeightsOption = typer.Option(
    None, "--weights", metavar="CKPT", help="Checkpoint of the original model (.pth/.pt/.bin or .safetensors)."
)
AllowMissingOption = typer.Option(False, "--allow-missing", help="Load a checkpoint whose keys do not all match.")
TrustCodeOption = typer.Option(
    False,
    "--trust-code",
    help="Allow importing and calling user code (pkg.module:factory, leaf modules) named by the spec or a recipe.",
)
StrictValuesOption = typer.Option(
    False, "--strict-values", help="Refuse weights holding NaN or infinity (default: warn)."
)


DEFAULT_INPUT_SIZE: tuple[int, ...] = (224, 224)
#: ``--input-size`` takes 1, 2 or 3 numbers (``L``, ``H W``, ``T H W``) or them joined by ``x``; shown as the 2-D
#: form so every help text fits 80 columns (the help says the rest).
INPUT_SIZE_METAVAR = "H W"
InputSizeOption = typer.Option(
    None,
    "--input-size",
    metavar=INPUT_SIZE_METAVAR,
    help="Input height and width; one number (length) for a 1-D model, three (frames, height, width) for a "
    "3-D one (default: a saved model's or a preset's own size, else "
    f"{DEFAULT_INPUT_SIZE[0]} {DEFAULT_INPUT_SIZE[1]}).",
)
_SIZE_NUMBER = re.compile(r"[0-9]+")


def join_size_arguments(args: list[str]) -> list[str]:
    """Join the 1 to 3 numbers after each ``--input-size`` into one ``AxBxC`` argument.

    Click options take a fixed number of values, and ``--input-size`` takes 1, 2 or 3: ``--input-size
    16 112 112`` reaches the option as ``16x112x112``; arguments after ``--`` are left alone.
    """
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        out.append(arg)
        i += 1
        if arg == "--":
            out += args[i:]
            break
        if arg == "--input-size":
            numbers: list[str] = []
            while i < len(args) and len(numbers) < 3 and _SIZE_NUMBER.fullmatch(args[i]):
                numbers.append(args[i])
                i += 1
            if numbers:
                out.append("x".join(numbers))
    return out


# -- parsers ------------------------------------------------------------------
def model_default_size(model: nn.Module, spec: str) -> tuple[int, ...]:
    """Return the input size of a model given without ``--input-size``: 224 224 for a 2-D model.

    A 1-D or 3-D model (its first conv or pool says) has no default: audio lengths and clip sizes
    vary too much, so the user is asked for one (exit 2) instead of running it at a 2-D size.
    """
    from ..engine.find import module_ndim

    ndim = next((n for m in model.modules() if (n := module_ndim(m)) is not None), 2)
    if ndim == 2:
        return DEFAULT_INPUT_SIZE
    form = "L (its length)" if ndim == 1 else "T H W (frames, height, width)"
    raise UsageError(f"{spec} is a {ndim}-D model: give --input-size {form}; only 2-D models default to 224 224")


def parse_input_size(value: str | None, default: tuple[int, ...] = DEFAULT_INPUT_SIZE) -> tuple[int, ...]:
    """Return a validated input size of 1 to 3 sides, or ``default`` when not given.

    Args:
        value: ``"64x64"`` (what :func:`join_size_arguments` makes of ``64 64``), ``"16000"`` or ``"8x64x64"``.
        default: The size when ``value`` is empty.
    """
    if not value:
        return default
    from ..validate import check_input_budget

    parts = value.lower().replace(",", "x").split("x")
    if not 1 <= len(parts) <= 3 or not all(_SIZE_NUMBER.fullmatch(p.strip()) for p in parts):
        raise UsageError(f"--input-size must be 1 to 3 positive integers (L, H W or T H W), got {value!r}")
    sides = tuple(int(p) for p in parts)
    if min(sides) < 1:
        raise UsageError(f"--input-size must be positive integers, got {' '.join(map(str, sides))}")
    try:
        return check_input_budget(sides, "--input-size")
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def check_file(path: Path | None, option: str, folder_hint: str = "") -> Path | None:
    """Refuse, before any slow work, a path that must name an existing file (exit 2); None passes.

    Args:
        path: The path given, or None when the option was not.
        option: The option's name, for the message.
        folder_hint: What to do instead when ``path`` is a folder.
    """
    if path is None:
        return None
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder, not a file{'; ' + folder_hint if folder_hint else ''}")
    if not path.is_file():
        what = "a broken link" if path.is_symlink() else "no such file"
        raise UsageError(f"{option} {path}: {what}")
    return path


def check_weights(path: Path | None) -> Path | None:
    """Refuse a ``--weights`` path that is not a file before any slow work (exit 2)."""
    return check_file(path, "--weights", "a saved dynoswap model folder is opened by naming it as the model")


def check_forward(model: nn.Module, size: tuple[int, ...], batch: int = 1) -> None:
    """Refuse an input size whose forward would ask for more activation memory than dynoswap allows."""
    from ..cost.memory import check_forward_budget

    try:
        check_forward_budget(model, size, "--input-size", batch)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


#: How a target size of each dimension is written, with an example.
_SIZE_FORMS = {1: ("L", "100"), 2: ("HxW", "100x96"), 3: ("TxHxW", "8x56x56")}


def parse_size(text: str, option: str = "--sizes", ndim: int = 2) -> tuple[int, ...]:
    """``"100x96"`` → (100, 96); a single number means the same on every axis (``ndim`` of them)."""
    parts = text.strip().lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * ndim
    if len(values) != ndim or min(values) < 1:
        form, example = _SIZE_FORMS[ndim]
        raise UsageError(f"{option}: {text!r} is not a size; write {form} with positive integers, e.g. {example}")
    if min(values) < MIN_OUTPUT_SIDE:
        raise UsageError(
            f"{option}: {text!r} cannot be hit exactly: a DynOPool's output is at least {MIN_OUTPUT_SIDE} on each side"
        )
    return tuple(values)


def parse_sizes(text: str | None, ndim: int = 2) -> list[tuple[int, ...]] | None:
    """``"100x96,52x50"`` → [(100, 96), (52, 50)]; ``ndim`` values per size (a single number: all axes)."""
    if text is None:
        return None
    items = [t for t in text.replace(" ", "").split(",") if t]
    if not items:
        raise UsageError("--sizes is empty; write target sizes per stage, e.g. 100x96,52x50")
    return [parse_size(t, ndim=ndim) for t in items]


def parse_scale(text: str, option: str) -> float | tuple[float, ...]:
    """``"0.5"`` → 0.5, ``"0.6x0.4"`` → (0.6, 0.4), one factor per axis (up to 3); every factor must be > 0."""
    parts = text.strip().lower().split("x")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2, 3) or not all(math.isfinite(v) and v > 0 for v in values):
        raise UsageError(f"{option}: {text!r} is not a scale factor; write R or RHxRW (RTxRHxRW) with numbers > 0")
    return values[0] if len(values) == 1 else tuple(values)


def parse_overrides(items: list[str] | None) -> dict[str, float | tuple[float, ...]] | None:
    """``["layer2.0.conv1=0.6"]`` → {"layer2.0.conv1": 0.6}."""
    if not items:
        return None
    out: dict[str, float | tuple[float, ...]] = {}
    for item in items:
        node, sep, value = item.partition("=")
        if not sep or not node.strip():
            raise UsageError(f"--override: {item!r} must look like NODE=R, e.g. layer2.0.conv1=0.6")
        out[node.strip()] = parse_scale(value, "--override")
    return out


def parse_kwargs(items: list[str] | None) -> dict[str, Any]:
    """``["drop_rate=0.1", "width=[1, 2]"]`` → {"drop_rate": 0.1, "width": [1, 2]} (values read as YAML)."""
    import yaml

    from ..errors import OptionError
    from ..io.bounded import loads_yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--model-kwargs: {item!r} must look like KEY=VALUE, e.g. drop_rate=0.1")
        try:
            where = f"--model-kwargs {key.strip()}"
            out[key.strip()] = loads_yaml(value, where, OptionError, syntax_errors=False) if value else None
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


# -- models -------------------------------------------------------------------
@dataclass
class LoadedModel:
    """A model ready for a command.

    Attributes:
        model: The module, in eval mode.
        source: Where it came from.
        spec: What the user typed.
        mismatch: Key mismatch of ``--weights`` (None when no checkpoint was loaded).
    """

    model: nn.Module
    source: ModelSource
    spec: str
    mismatch: KeyMismatch | None = None

    @property
    def is_saved(self) -> bool:
        """Whether the model is a saved (converted) dynoswap model."""
        from ..models import SAVED

        return self.source.library == SAVED


def load_model(
    spec: str,
    num_classes: int | None = None,
    model_kwargs: list[str] | dict[str, Any] | None = None,
    weights: Path | None = None,
    allow_missing: bool = False,
    trust_code: bool = False,
    strict_values: bool = False,
) -> LoadedModel:
    """Resolve a model spec and load ``--weights`` into it.

    Args:
        spec: Model name, ``tv:``/``timm:`` name, ``pkg.module:factory`` or a saved model path.
        num_classes: Classifier size.
        model_kwargs: ``KEY=VALUE`` strings or a ready dict.
        weights: Checkpoint to load (of the same architecture as the resolved model).
        allow_missing: Load only the matching keys instead of failing on a mismatch.
        trust_code: Allow user factories and user leaf modules (``--trust-code``).
        strict_values: Refuse weights holding NaN or infinity instead of warning (``--strict-values``).
    """
    check_weights(weights)
    from ..io.checkpoint import apply_state_dict, load_state_dict_file
    from ..io.saving import check_values
    from ..models import resolve

    kwargs = model_kwargs if isinstance(model_kwargs, dict) else parse_kwargs(model_kwargs)
    # Read the checkpoint first: a bad file fails before the (slower) model build.
    state = load_state_dict_file(weights) if weights is not None else None
    if state is not None:
        check_values(state, str(weights), strict=strict_values)
    model, source = resolve(
        spec, num_classes=num_classes, model_kwargs=kwargs or None, trust_code=trust_code, strict_values=strict_values
    )
    mismatch = apply_state_dict(model, state, allow_missing=allow_missing) if state is not None else None
    model.eval()
    return LoadedModel(model=model, source=source, spec=spec, mismatch=mismatch)
