"""Safe state-dict loading: weights_only / safetensors, wrapper keys, DDP prefixes, key matching.

Pickled checkpoints are read with ``torch.load(weights_only=True)``: a file that
carries code (any object other than tensors and plain containers) is refused and
its code never runs.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, foreign_message

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
#: Largest safetensors header read (the JSON index of the tensors), in bytes.
MAX_SAFETENSORS_HEADER = 100 << 20
#: Largest pickle stream scanned for code opcodes (a checkpoint's data.pkl is a few MB at most).
MAX_PICKLE_SCAN = 64 << 20


def check_safetensors_header(path: Path) -> None:
    """Check a safetensors file from its header alone: size, JSON, every tensor's bytes inside the file.

    Raises:
        CheckpointError: The header is too large, not JSON or names bytes outside the file.
    """
    import struct

    from .bounded import loads_json

    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(MAX_SAFETENSORS_HEADER, size - 8):
            raise CheckpointError(f"cannot read {path} as safetensors (damaged or another format: bad header length)")
        header = loads_json(fh.read(length), f"{path}: safetensors header", CheckpointError)
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path} as safetensors (damaged or another format: bad header)")
    data = size - 8 - length
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and name != "__metadata__" else None
        if name != "__metadata__" and not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(v, int) for v in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise CheckpointError(f"cannot read {path} as safetensors: tensor {name!r} lies outside the file")


def report_nonfinite(bad: list[str], where: str, strict: bool = False, stacklevel: int = 3) -> None:
    """Report weights holding NaN or infinity: a warning, or a ``CheckpointError`` when ``strict``."""
    if not bad:
        return
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    message = f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity ({shown})"
    if strict:
        raise CheckpointError(message)
    warnings.warn(message, stacklevel=stacklevel)


def read_safetensors_light(path: Path, small: Iterable[str] = ()) -> tuple[dict[str, list[float]], list[str]] | None:
    """Read a safetensors file without torch: the values of a few small float32 tensors and the non-finite keys.

    The header is checked first (:func:`check_safetensors_header`); the tensors are read with
    safetensors' numpy reader, which runs no code.

    Args:
        path: The file.
        small: Keys whose values to return (as flat lists).

    Returns:
        ``(values, nonfinite)``, or None when a tensor is in a dtype numpy cannot hold (bfloat16)
        or a key of ``small`` is missing or not float32: the caller then reads the file with torch.
    """
    import numpy as np
    from safetensors.numpy import load_file

    check_safetensors_header(path)
    try:
        arrays = load_file(str(path))
    except Exception:  # a dtype numpy lacks; a damaged file is refused by the torch reader with its message
        return None
    values: dict[str, list[float]] = {}
    for key in small:
        array = arrays.get(key)
        if array is None or array.dtype != np.float32:
            return None
        values[key] = [float(v) for v in array.reshape(-1)]
    bad = [k for k, a in arrays.items() if a.dtype.kind == "f" and not bool(np.isfinite(a).all())]
    return values, bad


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    check_safetensors_header(path)
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own SafetensorError
        detail = foreign_message(exc)
        raise CheckpointError(f"cannot read {path} as safetensors (damaged or another format: {detail})") from exc


# Pickle opcodes that import or call something: a file using them holds code, not only data.
CODE_OPCODES = frozenset({"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD"})


def _pickle_calls_code(path: Path) -> bool:
    """Whether the file's pickle stream uses opcodes that import or call (read with pickletools: nothing runs).

    Reads at most :data:`MAX_PICKLE_SCAN` bytes: the file is never read whole.
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                info = next((i for i in archive.infolist() if i.filename.endswith("data.pkl")), None)
                data = archive.read(info) if info is not None and info.file_size <= MAX_PICKLE_SCAN else b""
        else:
            with open(path, "rb") as fh:
                data = fh.read(MAX_PICKLE_SCAN)
        return any(op.name in CODE_OPCODES for op, _, _ in pickletools.genops(data))
    except Exception:  # not a pickle stream at all: random bytes, another format
        return False


def _read_pickle(path: Path) -> Any:
    import torch

    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols; a refusal below is the one line users need.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        code = next((line for line in lines if "GLOBAL" in line or "Unsupported global" in line), "")
        if not code and _pickle_calls_code(path):
            code = "it would import or call objects while loading"
        if not code:
            raise CheckpointError(
                f"cannot read {path}: it is neither a PyTorch checkpoint nor a safetensors file (damaged or another "
                "format)"
            ) from exc
        # weights_only refuses globals before any of them is called: the code never ran.
        raise CheckpointError(
            f"refused {path}: it contains pickled code or objects, not only tensors ({code}); re-save it as a plain "
            "state_dict (torch.save(model.state_dict(), ...)) or as .safetensors"
        ) from exc
    except EOFError as exc:
        raise CheckpointError(f"cannot read {path}: the file ends early (truncated or damaged)") from exc
    except (RuntimeError, OSError, ValueError) as exc:
        detail = foreign_message(exc)
        raise CheckpointError(f"cannot read {path}: not a readable PyTorch checkpoint ({detail})") from exc


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
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a file; "
            "a saved dynoswap model folder is opened by naming it as the model"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes)")
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
            f"checkpoint does not match the model ({mismatch.summary()}); allow_missing=True loads what matches",
            mismatch,
        )
    bad = {k for k, _, _ in mismatch.shape}
    model.load_state_dict(
        {k: v for k, v in state.items() if k not in bad and k not in mismatch.unexpected}, strict=False
    )
    return mismatch
