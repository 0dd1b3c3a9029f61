"""Reading and writing models: safe checkpoints and saved converted models."""

from .checkpoint import load_state_dict_file
from .saving import SaveError, load, read_recipe, save

__all__ = ["SaveError", "load", "load_state_dict_file", "read_recipe", "save"]
