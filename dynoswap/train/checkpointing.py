"""Per-epoch checkpoints that survive Ctrl-C: written to a temporary folder, then swapped in.

Layout of ``OUT/checkpoint/``::

    model/              dynoswap.save() output (recipe.json + model.safetensors), when the model has a
                        recipe with its source; ``--resume`` loads its weights
    weights.safetensors the state_dict instead, for a model that dynoswap.load could not rebuild
    train_state.pt      optimiser, scheduler, scaler, epoch, step and RNG states
                        (plain tensors and containers: loaded with weights_only=True)

A crash while writing leaves either the previous complete checkpoint in place or,
between the two renames, ``checkpoint.old``, which ``find_checkpoint`` also accepts.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

CHECKPOINT_DIR = "checkpoint"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "train_state.pt"
MODEL_DIR = "model"


def rng_state() -> dict[str, Any]:
    """Every RNG a training step can draw from, as tensors and plain values."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
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
    """``dynoswap.save`` when the model carries a recipe with its source; returns whether it did.

    A model converted without ``source=`` cannot be rebuilt by ``dynoswap.load``, so it
    gets ``weights.safetensors`` instead (enough for ``--resume``).
    """
    meta = getattr(model, "meta", None)
    recipe = meta.get("dynoswap") if isinstance(meta, dict) else None
    if not isinstance(recipe, dict) or not recipe.get("source"):
        return False
    from ..io import save

    save(model, path)
    return True


def save_checkpoint(out_dir: str | Path, model: nn.Module, state: dict[str, Any]) -> Path:
    """Write a complete checkpoint of ``model`` and training ``state`` atomically.

    Args:
        out_dir: Run folder; the checkpoint goes to ``out_dir/checkpoint``.
        model: The unwrapped model (not the DDP wrapper).
        state: Optimiser/scheduler/epoch/RNG state of plain tensors and containers.

    Returns:
        The checkpoint folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = out / CHECKPOINT_DIR
    tmp = out / f"{CHECKPOINT_DIR}.tmp"
    old = out / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if not _save_model_dir(model, tmp / MODEL_DIR):
        save_file(_state_dict_for_file(model), str(tmp / WEIGHTS_FILE))
    torch.save(state, tmp / STATE_FILE)
    # Swap: a complete checkpoint exists under one of the two names at every moment.
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _has_weights(folder: Path) -> bool:
    from ..io.saving import RECIPE_FILE
    from ..io.saving import WEIGHTS_FILE as MODEL_WEIGHTS

    model_dir = folder / MODEL_DIR
    return (folder / WEIGHTS_FILE).is_file() or (
        (model_dir / RECIPE_FILE).is_file() and (model_dir / MODEL_WEIGHTS).is_file()
    )


def find_checkpoint(out_dir: str | Path) -> Path | None:
    """Return the newest complete checkpoint folder under ``out_dir``, or ``None``."""
    out = Path(out_dir)
    for name in (CHECKPOINT_DIR, f"{CHECKPOINT_DIR}.old"):
        folder = out / name
        if _has_weights(folder) and (folder / STATE_FILE).is_file():
            return folder
    return None


def load_checkpoint(folder: str | Path, model: nn.Module) -> dict[str, Any]:
    """Load weights (alphas included) into ``model`` and return the training state."""
    folder = Path(folder)
    if (folder / WEIGHTS_FILE).is_file():
        weights = load_file(str(folder / WEIGHTS_FILE))
    else:
        from ..io.saving import read_weights

        weights = read_weights(folder / MODEL_DIR)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {folder} does not match this model (missing {missing[:5]}, unexpected {unexpected[:5]}); "
            "resume with the same model spec, conversion options and data"
        )
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
