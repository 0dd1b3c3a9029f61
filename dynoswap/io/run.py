"""Training run folders: their layout, checkpoint verification, and the final model a run holds.

Layout of a run folder ``OUT/`` (written by :mod:`dynoswap.train.checkpointing`)::

    log.jsonl            one record per epoch
    checkpoint/          the newest checkpoint (``model/`` is a saved model: recipe.json + model.safetensors,
                         or ``weights.safetensors`` for a model dynoswap.load could not rebuild), manifest.json
    checkpoint.prev/     the checkpoint before it
    .dynoswap-run        the run marker

Reading a run folder needs no torch: a run is used as a model through its newest intact
checkpoint's ``model/`` folder, which :func:`dynoswap.load` reads like any saved model.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError, ModelError, OutputExistsError, RunExistsError
from .bounded import read_json
from .output import describe

CHECKPOINT_DIR = "checkpoint"
PREVIOUS_DIR = "checkpoint.prev"
TEMP_DIR = "checkpoint.tmp"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
LOG_FILE = "log.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "dynoswap-checkpoint"
#: The run marker: a run folder holding it was started by dynoswap.
MARKER_FILE = ".dynoswap-run"
MARKER_FORMAT = "dynoswap-run"
#: The file locked while a trainer writes the run.
RUN_LOCK_FILE = ".dynoswap-run-lock"
#: Entries of a run folder that belong to a training run (``--force`` replaces them, nothing else).
RUN_ENTRIES = (LOG_FILE, CHECKPOINT_DIR, PREVIOUS_DIR, TEMP_DIR, "checkpoint.old")
#: Most files a checkpoint manifest may list.
MAX_MANIFEST_ENTRIES = 10_000


def file_sha256(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every entry under ``folder`` that is not a folder (links included: a planted link is an extra file)."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if (p.is_symlink() or not p.is_dir()) and p.relative_to(folder).as_posix() != MANIFEST_FILE
    )


def is_marked_run(out: Path) -> bool:
    """Whether ``out`` carries a run marker that dynoswap wrote (a plain file with the marker format)."""
    marker = out / MARKER_FILE
    try:
        if not stat.S_ISREG(marker.lstat().st_mode):
            return False
        data = read_json(marker, CheckpointError, limit=4096)
    except (OSError, CheckpointError):
        return False
    return isinstance(data, dict) and data.get("format") == MARKER_FORMAT


def has_manifest(folder: Path) -> bool:
    """Whether ``folder`` holds a readable checkpoint manifest of dynoswap's format."""
    try:
        data = read_json(folder / MANIFEST_FILE, CheckpointError)
    except (OSError, CheckpointError):
        return False
    return isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT


def verify_checkpoint(folder: str | Path) -> int:
    """Check a checkpoint folder against its manifest; returns its epoch.

    Raises:
        CheckpointError: A file is missing, changed or unlisted, or the manifest is unreadable (names the file).
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST_FILE}: it is incomplete or damaged")
    manifest = read_json(manifest_path, CheckpointError)
    try:
        hashes = manifest["sha256"]
        epoch = int(manifest["epoch"])
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(hashes, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise CheckpointError(f"{manifest_path} is damaged ({exc})") from exc
    if len(hashes) > MAX_MANIFEST_ENTRIES:
        raise CheckpointError(f"{manifest_path}: lists more than {MAX_MANIFEST_ENTRIES} files; refusing it")
    for name, expected in sorted(hashes.items()):
        _check_entry(name, expected, manifest_path)
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: {path} is missing")
        if file_sha256(path) != expected:
            raise CheckpointError(f"checkpoint {folder} is damaged: {path} does not match its recorded sha256")
    extra = sorted(set(checkpoint_files(folder)) - set(hashes))
    if extra:
        raise CheckpointError(f"checkpoint {folder} is damaged: {folder / extra[0]} is not in its manifest")
    return epoch


def _check_entry(name: Any, expected: Any, manifest_path: Path) -> None:
    """Check that a manifest entry names a file inside the checkpoint (relative, no ``..``) and a sha256 digest."""
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or name.startswith("/") or "\\" in name or any(p in ("..", ".") for p in parts) or "\0" in name:
        raise CheckpointError(f"{manifest_path}: entry {name!r} is not a file inside the checkpoint; refusing it")
    if not (isinstance(expected, str) and len(expected) == 64 and all(c in "0123456789abcdef" for c in expected)):
        raise CheckpointError(f"{manifest_path}: the sha256 of {name!r} is not a sha256 digest")


def temp_folders(out: Path) -> list[Path]:
    """Private checkpoint work folders a killed save left (real folders only)."""
    try:
        return [p for p in out.glob(f"{TEMP_DIR}-*") if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def check_new_run(out_dir: str | os.PathLike[str], force: bool = False) -> list[str]:
    """Check that ``out_dir`` may take a new run, without locking or writing; returns the entries to remove.

    Entries of a run folder without dynoswap's marker are never removed: they are not provably dynoswap's.

    Raises:
        OutputExistsError: ``out_dir`` is not a folder, or holds run entries that are not dynoswap's.
        RunExistsError: ``out_dir`` holds a run and ``force`` is False.
    """
    out = Path(out_dir)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"run folder {out} is {describe(out)}, not a folder")
    if not out.is_dir():
        return []
    present = [name for name in RUN_ENTRIES if os.path.lexists(out / name)]
    present += [p.name for p in temp_folders(out)]
    if present and not is_marked_run(out):
        raise OutputExistsError(
            f"{out} holds {', '.join(present)} but no dynoswap run marker ({MARKER_FILE}): they are not a dynoswap "
            "run; refusing to replace them"
        )
    if present and not force:
        raise RunExistsError(
            f"{out} already holds a training run ({', '.join(present)}): continue it (resume=True) or start it over "
            "(force=True)"
        )
    return present


def is_run_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a training run folder: dynoswap's run marker, or a checkpoint with dynoswap's manifest."""
    out = Path(path)
    if not out.is_dir():
        return False
    return is_marked_run(out) or any(has_manifest(out / name) for name in (CHECKPOINT_DIR, PREVIOUS_DIR))


def _newest_checkpoint(out: Path) -> Path:
    """Return the newest intact checkpoint folder of a run (``checkpoint``, else ``checkpoint.prev``), verified."""
    final, previous = out / CHECKPOINT_DIR, out / PREVIOUS_DIR
    for folder in (final, previous):
        if folder.is_symlink():
            raise CheckpointError(f"{folder} is a link, not the run's checkpoint folder; refusing it")
    if final.is_dir():
        try:
            verify_checkpoint(final)
        except CheckpointError as exc:
            hint = "no earlier intact checkpoint exists"
            if previous.is_dir():
                try:
                    hint = f"an earlier intact checkpoint (epoch {verify_checkpoint(previous)}) is in {previous}"
                except CheckpointError:
                    pass
            raise CheckpointError(f"{exc}; {hint}") from exc
        return final
    if previous.is_dir():
        verify_checkpoint(previous)
        return previous
    raise ModelError(f"run folder {out} has no checkpoint yet: its first epoch writes one")


def run_model_folder(path: str | os.PathLike[str]) -> Path:
    """Return the saved-model folder of a run's final model: ``model/`` of its newest intact checkpoint.

    At the end of a run that is the model of its last epoch; while a run trains, that of the
    last finished epoch. The checkpoint is verified against its manifest (sha256 of every file,
    links refused) before its folder is returned; nothing is imported or built.

    Raises:
        ModelError: The run has no checkpoint yet, or its checkpoint holds weights that dynoswap
            cannot rebuild a model for.
        CheckpointError: The newest checkpoint is damaged or is a link.
    """
    checkpoint = _newest_checkpoint(Path(path))
    model = checkpoint / MODEL_DIR
    if model.is_dir() and not model.is_symlink():
        return model
    raise ModelError(
        f"run folder {path}: {checkpoint} holds only {WEIGHTS_FILE}, not a saved model: the model was trained "
        "without a recorded source, so dynoswap cannot rebuild it; load those weights into the same converted model"
    )


def saved_model_folder(path: str | os.PathLike[str]) -> Path:
    """Return the folder to read a saved model from: a run folder's final model, anything else as given."""
    return run_model_folder(path) if is_run_folder(path) else Path(path)
