"""Anchors that follow the learned sizes: torchvision's AnchorGenerator with float strides.

torchvision's ``AnchorGenerator`` places the anchors of feature cell ``i`` at ``i * stride`` with
``stride = image_size // grid_size``, an integer. Once a converted backbone's scales move, a level's
grid no longer divides the image (128 / 11 = 11.64): the integer stride (11) puts the last cells'
anchors several pixels from their cells, and the grid no longer spans the image.
:class:`FloatStrideAnchorGenerator` keeps torchvision's convention (anchors at ``i * stride``,
zero-centred cell anchors) with ``stride = image_size / grid_size``; where the grid divides the image
its anchors are exactly torchvision's.

SSD's ``DefaultBoxGenerator`` needs no fix: without ``steps`` it places its boxes by the grid size itself.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList


class FloatStrideAnchorGenerator(AnchorGenerator):
    """``AnchorGenerator`` whose strides are ``image_size / grid_size`` (floats), per axis and level."""

    @classmethod
    def like(cls, stock: AnchorGenerator) -> FloatStrideAnchorGenerator:
        """Return the float-stride generator with ``stock``'s sizes, aspect ratios and training flag."""
        new = cls(stock.sizes, stock.aspect_ratios)
        new.train(stock.training)
        return new

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:  # noqa: D102
        grid_sizes = [list(f.shape[-2:]) for f in feature_maps]
        image_size = image_list.tensors.shape[-2:]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        # float64 0-d strides: the shifts are computed in float64, then cast to the features' dtype.
        strides = [
            [torch.tensor(image_size[axis] / g[axis], dtype=torch.float64, device=device) for axis in (0, 1)]
            for g in grid_sizes
        ]
        self.set_cell_anchors(dtype, device)
        levels = [a.to(dtype) for a in self.grid_anchors(grid_sizes, strides)]
        return [torch.cat(levels) for _ in range(len(image_list.image_sizes))]


def use_float_strides(model: nn.Module) -> list[str]:
    """Replace every stock torchvision ``AnchorGenerator`` of ``model`` (in place) by its float-stride form.

    Returns:
        The module paths replaced, in ``named_modules`` order.
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is AnchorGenerator and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FloatStrideAnchorGenerator.like(module))
            replaced.append(name)
    return replaced


def has_anchor_generator(model: nn.Module) -> bool:
    """Whether ``model`` holds a stock torchvision ``AnchorGenerator``."""
    return any(type(m) is AnchorGenerator for m in model.modules())
