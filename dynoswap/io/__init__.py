"""Reading and writing models: safe checkpoints, saved converted models, crash-safe outputs.

Public names load lazily so that importing the recipe format (``dynoswap.io.recipe``)
does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

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


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
