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


class OutputExistsError(DynoswapError, FileExistsError):
    """The output path is occupied by something that may not be replaced.

    Attributes:
        replaceable: The path holds a dynoswap output of the same kind, which forcing would replace.
    """

    def __init__(self, message: str, *, replaceable: bool = False) -> None:
        super().__init__(message)
        self.replaceable = replaceable


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


class ExportError(DynoswapError, RuntimeError):
    """A freeze or export that failed, or an exported file that does not match the eager model."""


class FrozenSizeError(DynoswapError, ValueError):
    """A frozen model called with an input size it was not frozen for."""


class LatencyTableError(OptionError):
    """A latency table that cannot be read, does not fit the model, or a backend that cannot run here."""
