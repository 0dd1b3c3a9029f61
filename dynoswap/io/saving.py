"""save()/load(): a directory with a JSON recipe and safetensors weights.

Nothing is pickled: ``load`` rebuilds the base model from the recipe's source (random
init, never downloads), replays the conversion with the recorded options and loads
the weights strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.convert import RECIPE_KEY, convert, leaf_from_json
from ..errors import OutputExistsError, SaveError
from .checkpoint import atomic_output

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "dynoswap-saved-model"
FORMAT_VERSION = 1


def recipe_of(model: nn.Module) -> dict[str, Any]:
    """Return the conversion recipe stored in a converted model's ``meta``."""
    recipe = getattr(model, "meta", {}).get(RECIPE_KEY)
    if recipe is None:
        raise SaveError("not a converted model: dynoswap.save needs the output of dynoswap.convert")
    return recipe


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors, each storage once; aliases map repeated keys to the kept one."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write ``path/recipe.json`` and ``path/model.safetensors`` atomically.

    Args:
        model: A GraphModule returned by ``dynoswap.convert`` (with ``source=`` given).
        path: Output directory.
        overwrite: Replace an existing saved model at ``path`` (other existing paths are refused).

    Returns:
        The output directory.
    """
    from safetensors.torch import save_file

    recipe = recipe_of(model)
    if not recipe.get("source"):
        raise SaveError(
            "the model's source is unknown, so load() could not rebuild it: pass source= to convert, e.g. "
            "convert(model, ..., source=ModelSource('torchvision', 'resnet50', {'num_classes': 10}))"
        )
    path = Path(path)
    exists = path.exists() or path.is_symlink()
    if exists and not (overwrite and (path / RECIPE_FILE).is_file()):
        raise OutputExistsError(f"{path} exists and is not a saved dynoswap model to overwrite; choose another path")
    tensors, aliases = _dedupe(model.state_dict())
    document = {"format": FORMAT, "format_version": FORMAT_VERSION, "recipe": recipe, "aliases": aliases}
    with atomic_output(path, force=exists) as tmp:
        tmp.mkdir()
        (tmp / RECIPE_FILE).write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
    return path


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read the recipe document of a saved model directory."""
    file = Path(path) / RECIPE_FILE
    if not file.is_file():
        raise SaveError(f"{path} is not a saved dynoswap model (no {RECIPE_FILE})")
    document = json.loads(file.read_text())
    if document.get("format") != FORMAT:
        raise SaveError(f"{file} is not a dynoswap recipe (format {document.get('format')!r})")
    return document


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the full state dict of a saved model directory, keys stored once expanded to every alias."""
    from safetensors.torch import load_file

    document = read_recipe(path)
    state = load_file(str(Path(path) / WEIGHTS_FILE))
    for alias, key in document.get("aliases", {}).items():
        state[alias] = state[key]
    return state


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a saved converted model: base model from its source, conversion replayed, weights loaded strictly."""
    from ..models import ModelSource, build_model

    document = read_recipe(path)
    recipe = document["recipe"]
    source = ModelSource.from_dict(recipe["source"])
    options = dict(recipe["options"])
    options["leaf_modules"] = [leaf_from_json(s) for s in options.get("leaf_modules", [])]
    base = build_model(source.library, source.name, source.kwargs)
    gm, _ = convert(base, tuple(recipe["input_size"]), source=source, check=False, **options)
    gm.load_state_dict(read_weights(path), strict=True)
    return gm
