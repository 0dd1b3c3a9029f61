"""The library's exceptions: one tree under :class:`DynoswapError`.

Messages speak about the library (what was wrong, what to pass instead), never
about command-line flags or exit codes: only :mod:`dynoswap.cli` knows those,
and it maps these types to exit codes in one table.

Each class also derives from the builtin that callers would catch without knowing
dynoswap (``ValueError`` for bad input, ``RuntimeError`` for a failure,
``FileExistsError`` for an occupied output), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DynoswapError(Exception):
    """Base class of every error dynoswap raises on purpose."""


# -- bad input: a spec, a file or an option that cannot be used ---------------------
class ModelError(DynoswapError, ValueError):
    """A model spec that cannot be resolved or built."""


class UntrustedCodeError(ModelError):
    """A recipe, spec or config would import or call code the caller did not opt in to, or fetch files.

    Attributes:
        trustable: Opting in to user code would allow it (False for downloads and file reads, never allowed).
    """

    def __init__(self, message: str, *, trustable: bool = True) -> None:
        super().__init__(message)
        self.trustable = trustable


class RecipeError(DynoswapError, ValueError):
    """A saved-model folder or recipe that is malformed, of an unknown version, or inconsistent."""


class PresetError(DynoswapError, ValueError):
    """A preset that cannot be found or is malformed."""


class DataError(DynoswapError, ValueError):
    """A data spec that cannot be read."""


class OptionError(DynoswapError, ValueError):
    """An option value that cannot be used here (a device, a size, a scale)."""


class BudgetError(OptionError):
    """A cost budget that is not a finite positive number, or that the model cannot reach within its scale bounds."""


class OutputExistsError(DynoswapError, FileExistsError):
    """The output path is occupied by something that may not be replaced.

    Attributes:
        replaceable: The path holds a dynoswap output of the same kind, which forcing would replace.
    """

    def __init__(self, message: str, *, replaceable: bool = False) -> None:
        super().__init__(message)
        self.replaceable = replaceable


class RunExistsError(OutputExistsError):
    """A run folder already holds a training run: resume it, or start it over."""

    def __init__(self, message: str) -> None:
        super().__init__(message, replaceable=True)


class OutputLockedError(OutputExistsError):
    """The output path is being written by another process."""


# -- failures: the input was fine, the work could not be done ------------------------
class ConversionError(DynoswapError, ValueError):
    """A model that cannot be converted; the message says why and what to do."""


class CheckpointError(DynoswapError, RuntimeError):
    """A checkpoint that cannot be read, is damaged, or does not fit the model."""


class SaveError(DynoswapError, RuntimeError):
    """A model that cannot be saved, or a save that does not read back as written."""


class TrainingError(DynoswapError, RuntimeError):
    """Training that cannot start or continue (an occupied run folder, a damaged resume state)."""


class MissingExtraError(DynoswapError, ImportError):
    """A feature that needs an optional dependency which is not installed; the message names the extra."""


class ExportError(DynoswapError, RuntimeError):
    """A freeze or export that failed, or an exported file that does not match the eager model."""


class FrozenSizeError(DynoswapError, ValueError):
    """A frozen model called with an input size it was not frozen for."""


# -- messages of errors raised by other libraries ----------------------------------------
#: Longest text kept from another library's error message.
MAX_FOREIGN_MESSAGE = 200
_UNSAFE_ADVICE = ("weights_only", "arbitrary code")


def foreign_message(exc: BaseException) -> str:
    """Return another library's error (torch, safetensors) as a short line: what it said, never how it got there.

    Keeps the first sentence, drops C++ frame dumps and any advice to load a file unsafely
    (``weights_only=False``), and cuts it at :data:`MAX_FOREIGN_MESSAGE` characters.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    first = first.split("Exception raised from", 1)[0].strip() or type(exc).__name__
    text = first.split(". ", 1)[0].rstrip(".")
    if any(word in text for word in _UNSAFE_ADVICE):
        text = "it is not in a format that is safe to load"
    if len(text) > MAX_FOREIGN_MESSAGE:
        text = text[: MAX_FOREIGN_MESSAGE - 3].rstrip() + "..."
    return text


class LatencyTableError(OptionError):
    """A latency table that cannot be read, does not fit the model, or a backend that cannot run here."""
