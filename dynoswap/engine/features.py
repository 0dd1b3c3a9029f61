"""timm ``features_only`` models: a ``feature_info`` whose reductions follow the learned sizes.

A converted timm feature extractor is a GraphModule, which does not carry the original's
``feature_info``. :func:`attach_feature_info` gives it a :class:`LearnedFeatureInfo`: the same
channels and module names, and each output's reduction measured on the converted model, as
``input_side / feature_side`` at the conversion's input size (a float once scales move, e.g.
64 / 13 = 4.92). The reductions are measured again whenever an alpha has changed, so they stay
true during and after training. ``reduction_hw`` holds the (rows, columns) pair.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.models._features import FeatureInfo
from torch import nn

from ..layers import DynOPoolNd


def _feature_sizes(model: nn.Module, input_size: tuple[int, ...]) -> list[tuple[int, ...]] | None:
    """Spatial size of each output of ``model`` at ``input_size`` (a list or dict of maps); None otherwise."""
    from ..cost.count import eval_mode, example_input

    with eval_mode(model), torch.no_grad():
        out = model(example_input(model, input_size))
    maps = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (list, tuple)) else None
    if maps is None or not all(isinstance(m, torch.Tensor) and m.ndim == 4 for m in maps):
        return None
    return [(int(m.shape[-2]), int(m.shape[-1])) for m in maps]


def attach_feature_info(original: nn.Module, converted: nn.Module, input_size: tuple[int, ...]) -> None:
    """Give ``converted`` a :class:`LearnedFeatureInfo` when ``original`` is a timm feature extractor."""
    info = getattr(original, "feature_info", None)
    if isinstance(info, FeatureInfo):
        converted.feature_info = LearnedFeatureInfo(info, converted, input_size)  # type: ignore[assignment]  # a plain attribute


def _alphas(model: nn.Module) -> tuple[float, ...]:
    return tuple(
        float(v) for m in model.modules() if isinstance(m, DynOPoolNd) and m.leader is m for v in m.alpha.detach()
    )


class LearnedFeatureInfo(FeatureInfo):
    """timm ``FeatureInfo`` whose ``reduction`` is measured on the converted model at its current scales."""

    def __init__(self, info: FeatureInfo, model: nn.Module, input_size: tuple[int, ...]) -> None:
        super().__init__(copy.deepcopy(info.info), info.out_indices)
        self.model = model
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self._measured_at: tuple[float, ...] | None = None

    def refresh(self) -> None:
        """Measure each output's reduction again if an alpha moved since the last measurement."""
        key = _alphas(self.model)
        if key == self._measured_at:
            return
        sizes = _feature_sizes(self.model, self.input_size)
        if sizes is not None and len(sizes) == len(self.out_indices):
            rows, cols = self.input_size
            for index, (h, w) in zip(self.out_indices, sizes, strict=True):
                self.info[index]["reduction"] = rows / h
                self.info[index]["reduction_hw"] = (rows / h, cols / w)
        self._measured_at = key

    def get(self, key: str, idx: Any = None) -> Any:  # noqa: D102
        self.refresh()
        return super().get(key, idx)

    def get_dicts(self, keys: Any = None, idx: Any = None) -> Any:  # noqa: D102
        self.refresh()
        return super().get_dicts(keys, idx)

    def __getitem__(self, item: Any) -> Any:  # noqa: D105
        self.refresh()
        return super().__getitem__(item)
