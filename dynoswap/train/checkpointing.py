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

A checkpoint is written to ``checkpoint.tmp`` and renamed into place; at every moment a
complete checkpoint exists under ``checkpoint`` or ``checkpoint.prev``, and ``OUT/log.jsonl``
is restored from the checkpoint that ``--resume`` continues from, so no epoch's line is lost.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import CheckpointError, OutputExistsError
from ..io.output import settle

CHECKPOINT_DIR = "checkpoint"
PREVIOUS_DIR = "checkpoint.prev"
TEMP_DIR = "checkpoint.tmp"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "train_state.pt"
MODEL_DIR = "model"
LOG_FILE = "log.jsonl"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "dynoswap-checkpoint"
#: Entries of a run folder that belong to a training run (``--force`` replaces them, nothing else).
RUN_ENTRIES = (LOG_FILE, CHECKPOINT_DIR, PREVIOUS_DIR, TEMP_DIR, "checkpoint.old")


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _log_lines(out: Path, epoch: int) -> list[dict[str, Any]]:
    """Return the records of the run's log before ``epoch`` (the committed log, one per epoch)."""
    path = out / LOG_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if isinstance(r, dict) and isinstance(r.get("epoch"), int) and r["epoch"] < epoch]


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    settle(tmp)
    os.replace(tmp, path)


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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final, previous, tmp = out / CHECKPOINT_DIR, out / PREVIOUS_DIR, out / TEMP_DIR
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if not _save_model_dir(model, tmp / MODEL_DIR):
        save_file(_state_dict_for_file(model), str(tmp / WEIGHTS_FILE))
    torch.save(state, tmp / STATE_FILE)
    epoch = int(state.get("epoch", 0))
    records = _log_lines(out, epoch if log_record is not None else epoch + 1)
    if log_record is not None:
        records.append(log_record)
    (tmp / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    manifest = {"format": MANIFEST_FORMAT, "epoch": epoch, "sha256": {f: _sha256(tmp / f) for f in _files(tmp)}}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    settle(tmp)
    # Swap: a complete checkpoint exists under one of the two names at every moment.
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        final.rename(previous)
    tmp.rename(final)
    # The log follows the checkpoint: a kill before this line is repaired by restore_log on resume.
    _write_text_atomic(out / LOG_FILE, (final / LOG_FILE).read_text())
    return final


def verify_checkpoint(folder: str | Path) -> int:
    """Check a checkpoint folder against its manifest; returns its epoch.

    Raises:
        CheckpointError: A file is missing, changed or unlisted, or the manifest is unreadable (names the file).
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {MANIFEST_FILE}: it is incomplete or damaged")
    try:
        manifest = json.loads(manifest_path.read_text())
        hashes = manifest["sha256"]
        epoch = int(manifest["epoch"])
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(hashes, dict):
            raise ValueError("unknown format")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{manifest_path} is damaged ({exc})") from None
    for name, expected in sorted(hashes.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is damaged: {path} is missing")
        if _sha256(path) != expected:
            raise CheckpointError(f"checkpoint {folder} is damaged: {path} does not match its recorded sha256")
    extra = sorted(set(_files(folder)) - set(hashes))
    if extra:
        raise CheckpointError(f"checkpoint {folder} is damaged: {folder / extra[0]} is not in its manifest")
    return epoch


def _intact_epoch(folder: Path) -> int | None:
    try:
        return verify_checkpoint(folder)
    except CheckpointError:
        return None


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """Return the newest intact checkpoint folder under ``out_dir``, or ``None`` when there is none.

    A kill between the two renames of a save leaves only ``checkpoint.prev``: it is used.

    Raises:
        CheckpointError: The newest checkpoint is damaged (the message names the file and any earlier
            intact checkpoint).
    """
    out = Path(out_dir)
    shutil.rmtree(out / TEMP_DIR, ignore_errors=True)  # a killed save's partial work
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
            raise CheckpointError(f"{exc}{hint}") from None
        return final
    if previous.exists():
        verify_checkpoint(previous)
        return previous
    return None


def restore_log(folder: str | Path, out_dir: str | Path) -> list[dict[str, Any]]:
    """Make ``out_dir/log.jsonl`` the log committed with checkpoint ``folder``; returns its records."""
    text = (Path(folder) / LOG_FILE).read_text()
    _write_text_atomic(Path(out_dir) / LOG_FILE, text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


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
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {folder / STATE_FILE}: {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{folder / STATE_FILE} holds {type(state).__name__}, not a training state")
    return state


def prepare_run_folder(out_dir: str | Path, force: bool = False) -> Path:
    """Make ``out_dir`` ready for a new run: an existing run is refused, or with ``force`` its entries removed.

    Raises:
        OutputExistsError: ``out_dir`` is a file, or holds a run and ``force`` is False.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"run folder {out} is a file of {out.stat().st_size} bytes, not a folder")
    present = [name for name in RUN_ENTRIES if (out / name).exists()]
    if present and not force:
        raise OutputExistsError(
            f"{out} already holds a training run ({', '.join(present)}); continue it with resume, or start it over",
            replaceable=True,
        )
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return out
