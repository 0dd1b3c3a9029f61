"""Training DynOPool scales: the fit loop (eq. 8), built-in data sets, DDP helpers, checkpoints, plots."""

from .checkpointing import find_checkpoint, load_checkpoint, save_checkpoint
from .data import DATA_HANDLERS, DataBundle, DataError, load_data, make_loaders
from .distributed import DistContext, init_from_env, sync_alphas
from .loop import fit, mean_log_aspect, probe_pools, read_log
from .models import small_vgg
from .plot import plot_history

__all__ = [
    "DATA_HANDLERS",
    "DataBundle",
    "DataError",
    "DistContext",
    "find_checkpoint",
    "fit",
    "init_from_env",
    "load_checkpoint",
    "load_data",
    "make_loaders",
    "mean_log_aspect",
    "plot_history",
    "probe_pools",
    "read_log",
    "save_checkpoint",
    "small_vgg",
    "sync_alphas",
]
