"""The GMACs loss (paper eq. 7) and the optimiser helpers that go with it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..layers import DynOPoolNd
from .reference import unwrap
from .resolution import resolution_graph


def gmacs_loss(model: nn.Module, input_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Eq. 7: the sum over MAC-bearing layers of (H_t W_t) / (H_0 W_0) * GMACs_0[layer].

    Every counted layer's MACs are proportional to the area of its feature map,
    so the loss is ``sum(c * h * w)`` over resolution nodes (a handful of terms)
    plus the constant cost after global pooling, with straight-through sizes
    (:func:`dynoswap.layers.straight_through_size`). At the reference state it
    equals :func:`count_gmacs` of the model; its gradient reaches every upstream
    alpha, and tied layers add into their shared alpha.

    The resolution graph is recorded on first use (a meta-device analysis and one fvcore
    count at the reference input size) and cached per model; it is evaluated at the
    requested size, so every call answers for its own ``input_size``, in any order.

    Args:
        model: A converted model (or any fx-traceable model with DynOPoolNd).
        input_size: (H, W) to cost; default: the converted model's input size (or, for a
            model without a recipe, the size it was first recorded at).

    Returns:
        A float64 scalar in GMACs (batch 1), to be weighted by lambda (eq. 8).
    """
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    return resolution_graph(model, size).gmacs(size)


def _alpha_params(model: nn.Module) -> list[nn.Parameter]:
    found: dict[int, nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, DynOPoolNd):
            found.setdefault(id(m.alpha), m.alpha)
    return list(found.values())


def param_groups(model: nn.Module, lr: float, alpha_lr: float, weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimiser parameter groups: the weights, and the alphas with their own lr and no weight decay.

    Each Parameter appears once (tied alphas are one Parameter). Pass the result
    to any ``torch.optim`` optimiser; supplement Table 1 uses e.g. lr 1e-1,
    alpha lr 1e-2, weight decay 5e-4 for VGG-16 on CIFAR-100.

    Args:
        model: Model with DynOPoolNd layers.
        lr: Learning rate of the weights.
        alpha_lr: Learning rate of the alphas.
        weight_decay: Weight decay of the weights (alphas get none).

    Returns:
        ``[{"name": "weights", ...}, {"name": "alphas", ...}]`` (a group is left out when empty).
    """
    alphas = _alpha_params(model)
    alpha_ids = {id(p) for p in alphas}
    weights = [p for p in model.parameters() if id(p) not in alpha_ids]
    groups = [
        {"name": "weights", "params": weights, "lr": lr, "weight_decay": weight_decay},
        {"name": "alphas", "params": alphas, "lr": alpha_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def alphas(model: nn.Module, input_size: int | Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per DynOPoolNd, in execution order: name, alpha, scale, in/out size and tie group.

    Sizes come from the resolution graph and the current alphas (no forward
    pass). JSON-able, for logs and the CLI.

    Args:
        model: A converted model.
        input_size: (H, W) the sizes are given for (and the reference when
            recording); default: the converted model's reference size.

    Returns:
        A list of dicts with keys ``name``, ``alpha``, ``scale``, ``in_size``,
        ``out_size``, ``group`` (the name of the layer owning the alpha).
    """
    model = unwrap(model)
    graph = resolution_graph(model, input_size)
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    sizes = graph.int_sizes(input_size)
    names = {id(m): name for name, m in model.named_modules()}
    rows = []
    for name, node in graph.dynopools.items():
        m = model.get_submodule(name)
        assert isinstance(m, DynOPoolNd)
        rows.append(
            {
                "name": name,
                "alpha": [float(a) for a in m.alpha.detach().tolist()],
                "scale": list(m.scale),
                "in_size": list(sizes[graph.dynopool_inputs[name]]),
                "out_size": list(sizes[node]),
                "group": names.get(id(m.leader), name),
            }
        )
    return rows
