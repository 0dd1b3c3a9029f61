"""Reading and writing models: safe checkpoints, saved converted models, crash-safe outputs.

Public names load lazily so that importing the recipe format (``dynoswap.io.recipe``)
does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "Recipe": "recipe",
    "recipe_of": "recipe",
    "is_saved_model": "recipe",
    "SaveError": "saving",
    "load": "saving",
    "read_recipe": "saving",
    "save": "saving",
    "load_state_dict_file": "checkpoint",
    "replace_output": "output",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .checkpoint import load_state_dict_file  # noqa: F401
    from .output import replace_output  # noqa: F401
    from .recipe import Recipe, is_saved_model, recipe_of  # noqa: F401
    from .saving import SaveError, load, read_recipe, save  # noqa: F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'dynoswap.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
