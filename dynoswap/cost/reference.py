"""Which model a cost is about: the one inside training wrappers, and the input size it was converted for."""

from __future__ import annotations

from torch import nn


def unwrap(model: nn.Module) -> nn.Module:
    """Return the model inside DataParallel / DDP / torch.compile wrappers (the one that was converted).

    A whole model with one converted part (``convert(..., submodule=...)``) gives that part.
    """
    from ..io.recipe import converted_part

    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return converted_part(model)


def reference_input_size(model: nn.Module) -> tuple[int, ...] | None:
    """Read the input size a converted model was built for (its recipe's ``input_size``)."""
    from ..io.recipe import input_size_of

    return input_size_of(model)
