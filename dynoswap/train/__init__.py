"""Training DynOPool scales: the fit loop (eq. 8), built-in data sets, DDP helpers, checkpoints, plots.

Public names load lazily (PEP 562), so that a command can check its DATA spec
(:func:`dynoswap.train.data.check_data_spec`) before importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_names

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "find_checkpoint": "checkpointing",
    "load_checkpoint": "checkpointing",
    "save_checkpoint": "checkpointing",
    "DATA_HANDLERS": "data",
    "DataBundle": "data",
    "DataError": "data",
    "load_data": "data",
    "make_loaders": "data",
    "DistContext": "distributed",
    "init_from_env": "distributed",
    "sync_alphas": "distributed",
    "fit": "loop",
    "mean_log_aspect": "loop",
    "probe_pools": "loop",
    "read_log": "loop",
    "small_vgg": "models",
    "plot_history": "plot",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .checkpointing import find_checkpoint, load_checkpoint, save_checkpoint  # noqa: F401
    from .data import DATA_HANDLERS, DataBundle, DataError, load_data, make_loaders  # noqa: F401
    from .distributed import DistContext, init_from_env, sync_alphas  # noqa: F401
    from .loop import fit, mean_log_aspect, probe_pools, read_log  # noqa: F401
    from .models import small_vgg  # noqa: F401
    from .plot import plot_history  # noqa: F401


__getattr__, __dir__ = lazy_names(__name__, _EXPORTS)
