"""Per-epoch checkpoints that survive a kill: the log committed with the weights, content hashes verified.

Layout of a run folder ``OUT/``::

    log.jsonl            one record per epoch, rewritten from the checkpoint's copy at each commit
    checkpoint/          the newest checkpoint
      model/             dynoswap.save() output (recipe.json + model.safetensors), when the model has a
                         recipe with its source; ``--resume`` loads its weights
      weights.safetensors  the state_dict instead, for a model that dynoswap.load could not rebuild
      train_state.pt     optimiser, scheduler, scaler, epoch, step and RNG states
                         (plain tensors and containers: loaded with weights_only=True)
      log.jsonl          the log up to this checkpoint's epoch: the log and the weights commit together
      manifest.json      sha256 of every file above, written last
    checkpoint.prev/     the checkpoint before it, kept so that a damaged newest one has a fallback
    .dynoswap-run        the run marker: proves the folder's run entries are dynoswap's (``--force``
                         replaces them only when it is there)
    .dynoswap-run-lock   locked (``flock``) while a trainer writes the run: a second one is refused

A checkpoint is written to a private ``checkpoint.tmp-*`` folder (``mkdtemp``) and renamed into place; at every moment a
complete checkpoint exists under ``checkpoint`` or ``checkpoint.prev``, and ``OUT/log.jsonl``
is restored from the checkpoint that ``--resume`` continues from, so no epoch's line is lost.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, OutputExistsError, OutputLockedError, foreign_message
from ..io.bounded import MAX_LOG_BYTES, MAX_LOG_LINE_BYTES, loads_json, read_capped
from ..io.output import describe, open_private, settle
from ..io.run import (
    CHECKPOINT_DIR,
    LOG_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MARKER_FILE,
    MARKER_FORMAT,
    MODEL_DIR,
    PREVIOUS_DIR,
    RUN_ENTRIES,
    RUN_LOCK_FILE,
    STATE_FILE,
    TEMP_DIR,
    WEIGHTS_FILE,
    check_new_run,
    checkpoint_files,
    file_sha256,
    has_manifest,
    is_marked_run,
    temp_folders,
    verify_checkpoint,
)


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = cast(tuple[str, Any, int, int, float], np.random.get_state())
        state["numpy"] = {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    except ImportError:  # numpy is optional for torch
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        s = state["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"]))


def _state_dict_for_file(model: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage; clone makes every tensor its own.
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def _save_model_dir(model: nn.Module, path: Path) -> bool:
    """Write a dynoswap saved-model folder when the model carries a recipe with its source; returns whether it did.

    A model converted without ``source=`` cannot be rebuilt by ``dynoswap.load``, so it
    gets ``weights.safetensors`` instead (enough for ``--resume``).
    """
    from ..io.recipe import raw_recipe_of
    from ..io.saving import write_saved

    recipe = raw_recipe_of(model)
    if recipe is None or not recipe.get("source"):
        return False
    write_saved(model, path)
    return True


def parse_log(text: str, where: str) -> list[dict[str, Any]]:
    """Parse a training log's lines, each a JSON object within the bounds of :mod:`dynoswap.io.bounded`.

    Raises:
        CheckpointError: A line is too long, too deep or not JSON (the message names the file and line).
    """
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LOG_LINE_BYTES:
            raise CheckpointError(f"{where}: line {number} is longer than {MAX_LOG_LINE_BYTES} bytes; refusing it")
        records.append(loads_json(line, f"{where}: line {number}", CheckpointError))
    return records


def read_log_file(path: Path) -> list[dict[str, Any]]:
    """Read a training log of at most :data:`~dynoswap.io.bounded.MAX_LOG_BYTES` through :func:`parse_log`."""
    data = read_capped(path, MAX_LOG_BYTES, CheckpointError, "training log")
    return parse_log(data.decode("utf-8", "replace"), str(path))


def _log_lines(out: Path, epoch: int) -> list[dict[str, Any]]:
    """Return the records of the run's log before ``epoch`` (the committed log, one per epoch)."""
    path = out / LOG_FILE
    if not path.is_file():
        return []
    records = read_log_file(path)
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] < epoch]


def _write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` through a temp file made with ``mkstemp`` (O_EXCL, never through a link)."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        settle(Path(name))
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


def _remove_entry(path: Path) -> None:
    """Remove a run entry: a link itself (never what it points to), a file, or a folder."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# -- the run folder: marker and lock ---------------------------------------------------
_HELD: dict[str, int] = {}


def _other_rank() -> bool:
    """Whether this process is a distributed rank other than 0 (rank 0 holds the run lock for all)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def hold_run_lock(out: Path) -> None:
    """Lock ``out`` for this process until it exits (or :func:`release_run_lock`): one trainer per run.

    The lock file is opened with ``O_NOFOLLOW``. On read-only media no lock is needed (nothing can write).
    Under torch.distributed only rank 0 takes it: the other ranks of the same run never write it.

    Raises:
        OutputLockedError: Another process is training into ``out``.
        OutputExistsError: A link or something else is planted at the lock's name.
    """
    import fcntl

    key = os.path.realpath(out)
    if key in _HELD or _other_rank():
        return
    lock = out / RUN_LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputExistsError(f"{lock} is a symbolic link, not dynoswap's run lock; not following it") from exc
        if exc.errno in (errno.EROFS, errno.EACCES):
            return
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputExistsError(f"{lock} is not dynoswap's run lock (not a plain file)")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise OutputLockedError(
            f"{out} is being trained into by another process; wait for it or choose another run folder"
        ) from exc
    _HELD[key] = fd


def release_run_lock(out: Path) -> None:
    """Release this process's lock on ``out`` (a no-op when it holds none)."""
    fd = _HELD.pop(os.path.realpath(out), None)
    if fd is not None:
        os.close(fd)


def _mark(out: Path) -> None:
    """Write the run marker (O_EXCL | O_NOFOLLOW: never through a planted link)."""
    fd = open_private(out / MARKER_FILE, mode=0o644)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps({"format": MARKER_FORMAT, "version": 1}) + "\n")
    settle(out / MARKER_FILE)


def claim_run_folder(out: Path) -> Path:
    """Lock ``out`` and make sure it is dynoswap's run folder, marking it when it holds no run yet.

    An unmarked folder is adopted when none of the run's entries is there, or when its
    checkpoint carries dynoswap's manifest (a run started before markers existed).

    Raises:
        OutputExistsError: ``out`` is not a folder, or holds run entries that are not dynoswap's.
        OutputLockedError: Another process is training into ``out``.
    """
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputExistsError(f"run folder {out} is {describe(out)}, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    hold_run_lock(out)
    if is_marked_run(out):
        return out
    present = [name for name in RUN_ENTRIES if os.path.lexists(out / name)]
    adoptable = any(has_manifest(out / name) for name in (CHECKPOINT_DIR, PREVIOUS_DIR))
    if present and not adoptable:
        raise OutputExistsError(
            f"{out} holds {', '.join(present)} but no dynoswap run marker ({MARKER_FILE}): they are not a dynoswap "
            "run; refusing to replace them"
        )
    if os.path.lexists(out / MARKER_FILE):
        raise OutputExistsError(f"{out / MARKER_FILE} is {describe(out / MARKER_FILE)}, not dynoswap's run marker")
    _mark(out)
    return out


def save_checkpoint(
    out_dir: str | Path, model: nn.Module, state: dict[str, Any], log_record: dict[str, Any] | None = None
) -> Path:
    """Write a complete checkpoint of ``model``, the training ``state`` and the log, then swap it in.

    Args:
        out_dir: Run folder; the checkpoint goes to ``out_dir/checkpoint``.
        model: The unwrapped model (not the DDP wrapper).
        state: Optimiser/scheduler/epoch/RNG state of plain tensors and containers.
        log_record: This epoch's log record: committed with the checkpoint and appended to ``out_dir/log.jsonl``.

    Returns:
        The checkpoint folder.
    """
    out = claim_run_folder(Path(out_dir))
    final, previous = out / CHECKPOINT_DIR, out / PREVIOUS_DIR
    for stale in [*temp_folders(out), out / TEMP_DIR]:
        _remove_entry(stale)  # a killed save's partial work (ours: the run folder is marked)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_DIR}-", dir=out))
    try:
        if not _save_model_dir(model, tmp / MODEL_DIR):
            save_file(_state_dict_for_file(model), str(tmp / WEIGHTS_FILE))
        torch.save(state, tmp / STATE_FILE)
        epoch = int(state.get("epoch", 0))
        records = _log_lines(out, epoch if log_record is not None else epoch + 1)
        if log_record is not None:
            records.append(log_record)
        (tmp / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
        hashes = {f: file_sha256(tmp / f) for f in checkpoint_files(tmp)}
        manifest = {"format": MANIFEST_FORMAT, "epoch": epoch, "sha256": hashes}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        settle(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # disk full, a kill signal turned exception: no partial work left
        raise
    # Swap: a complete checkpoint exists under one of the two names at every moment.
    if final.exists():
        _remove_entry(previous)
        final.rename(previous)
    tmp.rename(final)
    # The log follows the checkpoint: a kill before this line is repaired by restore_log on resume.
    _write_text_atomic(out / LOG_FILE, (final / LOG_FILE).read_text())
    return final


def _intact_epoch(folder: Path) -> int | None:
    try:
        return verify_checkpoint(folder)
    except CheckpointError:
        return None


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """Return the newest intact checkpoint folder under ``out_dir``, or ``None`` when there is none.

    A kill between the two renames of a save leaves only ``checkpoint.prev``: it is used.
    The caller resumes the run, so this process takes the run lock (see :func:`hold_run_lock`).

    Raises:
        OutputLockedError: Another process is training into ``out_dir``.
        CheckpointError: The newest checkpoint is damaged (the message names the file and any earlier
            intact checkpoint).
    """
    out = Path(out_dir)
    if out.is_dir():
        hold_run_lock(out)  # a resume is a trainer: refused while another one writes the run
    final, previous = out / CHECKPOINT_DIR, out / PREVIOUS_DIR
    if final.exists():
        try:
            verify_checkpoint(final)
        except CheckpointError as exc:
            epoch = _intact_epoch(previous) if previous.exists() else None
            hint = (
                f"; an earlier intact checkpoint (epoch {epoch}) is in {previous}: replace {final} by it to "
                "resume from there"
                if epoch is not None
                else "; no earlier intact checkpoint exists"
            )
            raise CheckpointError(f"{exc}{hint}") from exc
        return final
    if previous.exists():
        verify_checkpoint(previous)
        return previous
    return None


def restore_log(folder: str | Path, out_dir: str | Path) -> list[dict[str, Any]]:
    """Make ``out_dir/log.jsonl`` the log committed with checkpoint ``folder``; returns its records."""
    file = Path(folder) / LOG_FILE
    text = read_capped(file, MAX_LOG_BYTES, CheckpointError, "training log").decode("utf-8", "replace")
    records = parse_log(text, str(file))
    out = claim_run_folder(Path(out_dir))
    _write_text_atomic(out / LOG_FILE, text)
    return records


def load_checkpoint(folder: str | Path, model: nn.Module) -> dict[str, Any]:
    """Verify a checkpoint, load its weights (alphas included) into ``model`` and return the training state.

    Raises:
        CheckpointError: The checkpoint is damaged or does not fit ``model``.
    """
    from ..io.checkpoint import load_state_dict_file

    folder = Path(folder)
    verify_checkpoint(folder)
    if (folder / WEIGHTS_FILE).is_file():
        weights = load_state_dict_file(folder / WEIGHTS_FILE)
    else:
        from ..io.saving import read_weights

        weights = read_weights(folder / MODEL_DIR)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {folder} does not match this model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "resume with the same model spec, conversion options and data"
        )
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused {folder / STATE_FILE}: it holds pickled objects, not only tensors and containers, so dynoswap "
            "did not write it; start the run over"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read {folder / STATE_FILE}: {foreign_message(exc)}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{folder / STATE_FILE} holds {type(state).__name__}, not a training state")
    return state


def prepare_run_folder(out_dir: str | Path, force: bool = False) -> Path:
    """Make ``out_dir`` ready for a new run and lock it for this process.

    An existing dynoswap run (a folder with dynoswap's run marker) is refused, or with
    ``force`` its run entries are removed. Entries of a run folder without the marker are
    never removed: they are not provably dynoswap's.

    Raises:
        RunExistsError: ``out_dir`` holds a run and ``force`` is False.
        OutputExistsError: ``out_dir`` is a file, or holds run entries that are not dynoswap's.
        OutputLockedError: Another process is training into ``out_dir``.
    """
    out = Path(out_dir)
    check_new_run(out, force=True)  # before the lock: a foreign folder gets nothing written into it
    out.mkdir(parents=True, exist_ok=True)
    hold_run_lock(out)
    present = check_new_run(out, force)
    for name in present:
        _remove_entry(out / name)
    return claim_run_folder(out)
