"""Safe state-dict loading: weights_only / safetensors, wrapper keys, DDP prefixes, key matching.

Pickled checkpoints are read with ``torch.load(weights_only=True)``: a file that
carries code (any object other than tensors and plain containers) is refused and
its code never runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, OutputExistsError

if TYPE_CHECKING:
    import torch
    from torch import nn

# Keys under which training scripts commonly nest the weights, tried in order.
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
# Prefixes added by wrappers: DistributedDataParallel/DataParallel, torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class KeyMismatch:
    """How a state dict's keys differ from a model's.

    Attributes:
        missing: Model keys the state dict lacks.
        unexpected: State dict keys the model lacks.
        shape: ``(key, model shape, checkpoint shape)`` for keys whose shapes differ.
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shape)

    def rows(self) -> list[tuple[str, str, str]]:
        """``(problem, key, detail)`` rows for a table."""
        out = [("missing", k, "in model, not in checkpoint") for k in self.missing]
        out += [("unexpected", k, "in checkpoint, not in model") for k in self.unexpected]
        out += [("shape", k, f"model {list(m)} vs checkpoint {list(c)}") for k, m, c in self.shape]
        return out

    def summary(self) -> str:
        """One line: counts of each problem."""
        return f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.shape)} with another shape"


class KeyMismatchError(CheckpointError):
    """The checkpoint's keys do not match the model; ``.mismatch`` holds the details."""

    def __init__(self, message: str, mismatch: KeyMismatch) -> None:
        super().__init__(message)
        self.mismatch = mismatch


# -- reading ------------------------------------------------------------------
def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from exc


def _read_pickle(path: Path) -> Any:
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols; a refusal below is the one line users need.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses globals before any of them is called: the code never ran.
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "Unsupported global" in line or "GLOBAL" in line), "")
        raise CheckpointError(
            f"refused {path}: it contains pickled code or objects, not only tensors"
            f"{' (' + detail.strip() + ')' if detail else ''}; re-save it as a plain state_dict "
            "(torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc}"
        ) from exc


READERS = {".safetensors": _read_safetensors}


def _is_tensor_dict(obj: Any) -> bool:
    import torch

    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a loaded checkpoint and strip wrapper prefixes.

    Accepts a bare state dict or one nested under ``state_dict``/``model``/... keys;
    non-tensor entries (e.g. DDP's ``_metadata``, step counters) are dropped.
    """
    import torch

    seen = 0
    while isinstance(obj, Mapping) and not _is_tensor_dict(obj) and seen < 4:
        nested = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            break
        obj, seen = nested, seen + 1
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{where} holds {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{where} has no tensors (keys: {', '.join(map(str, list(obj)[:8]))})")
    return strip_prefixes(tensors)


def strip_prefixes(state: dict[str, Any]) -> dict[str, Any]:
    """Remove a wrapper prefix (``module.``, ``_orig_mod.``) shared by every key, repeatedly."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIP_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat state dict, safely.

    Args:
        path: ``.safetensors`` file, or a torch pickle (``.pth``/``.pt``/``.bin``/...) holding a
            state dict, possibly nested under ``state_dict``/``model`` and DDP-prefixed.

    Raises:
        CheckpointError: Missing file, unreadable file, or a pickle that carries code.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    reader = READERS.get(path.suffix.lower(), _read_pickle)
    return unwrap_state_dict(reader(path), str(path))


# -- matching -----------------------------------------------------------------
def compare_keys(model: nn.Module, state: Mapping[str, torch.Tensor]) -> KeyMismatch:
    """How ``state``'s keys and shapes differ from ``model.state_dict()``."""
    own = model.state_dict()
    mismatch = KeyMismatch(
        missing=[k for k in own if k not in state],
        unexpected=[k for k in state if k not in own],
    )
    for key, value in state.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            mismatch.shape.append((key, tuple(own[key].shape), tuple(value.shape)))
    return mismatch


def apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], allow_missing: bool = False) -> KeyMismatch:
    """Load ``state`` into ``model``; refuse a mismatch unless ``allow_missing``.

    With ``allow_missing`` the matching keys are loaded and the rest is left as is.

    Returns:
        The mismatch (empty when every key matched).

    Raises:
        KeyMismatchError: Keys or shapes differ and ``allow_missing`` is False.
    """
    mismatch = compare_keys(model, state)
    if mismatch and not allow_missing:
        raise KeyMismatchError(
            f"checkpoint does not match the model ({mismatch.summary()}); pass --allow-missing to load what matches",
            mismatch,
        )
    bad = {k for k, _, _ in mismatch.shape}
    model.load_state_dict(
        {k: v for k, v in state.items() if k not in bad and k not in mismatch.unexpected}, strict=False
    )
    return mismatch


# -- writing ------------------------------------------------------------------
def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an existing output unless ``force``; returns the path."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not force:
        raise OutputExistsError(f"output {path} already exists; pass --force to overwrite it")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Write a file or directory to a temporary sibling, then rename it into place.

    A crash or error while writing leaves any previous output untouched and no partial
    output behind.

    Args:
        path: Final path.
        force: Replace an existing output.

    Yields:
        The temporary path to write (it does not exist yet).
    """
    path = check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp = work / path.name
    try:
        yield tmp
        if not tmp.exists():
            raise CheckpointError(f"nothing was written for {path}")
        if path.exists() or path.is_symlink():
            # Move the old output aside first so the rename below cannot fail on a non-empty dir.
            old = work / (path.name + ".old")
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
