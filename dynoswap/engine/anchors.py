"""Anchors and RoI pooling that follow the learned sizes: torchvision's generators and poolers with float strides.

torchvision's ``AnchorGenerator`` places the anchors of feature cell ``i`` at ``i * stride`` with
``stride = image_size // grid_size``, an integer. Once a converted backbone's scales move, a level's
grid no longer divides the image (128 / 11 = 11.64): the integer stride (11) puts the last cells'
anchors several pixels from their cells, and the grid no longer spans the image.
:class:`FloatStrideAnchorGenerator` keeps torchvision's convention (anchors at ``i * stride``,
zero-centred cell anchors) with ``stride = image_size / grid_size``; where the grid divides the image
its anchors are exactly torchvision's.

The two-stage detectors' ``MultiScaleRoIAlign`` has the same flaw: it rounds each level's scale to a
power of two (``2 ** round(log2(grid / image))``) and keeps the first scales it sees.
:class:`FloatScaleRoIAlign` samples each level at ``grid / padded image`` per axis, measured on
every call; the level each box is pooled from is still chosen by torchvision's rule.

SSD's ``DefaultBoxGenerator`` needs no fix: without ``steps`` it places its boxes by the grid size itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


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


class FloatScaleRoIAlign(MultiScaleRoIAlign):
    """``MultiScaleRoIAlign`` sampling each level at ``grid / padded image`` per axis, measured on every call.

    Attributes:
        size_divisible: The detector transform's padding multiple: the batch the features cover is each
            image side rounded up to it.
    """

    def __init__(self, *args: object, size_divisible: int = 32, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.size_divisible = int(size_divisible)

    @classmethod
    def like(cls, stock: MultiScaleRoIAlign, size_divisible: int) -> FloatScaleRoIAlign:
        """Return the float-scale pooler with ``stock``'s levels, output size and sampling ratio."""
        new = cls(
            list(stock.featmap_names),
            stock.output_size,
            stock.sampling_ratio,
            canonical_scale=stock.canonical_scale,
            canonical_level=stock.canonical_level,
            size_divisible=size_divisible,
        )
        new.train(stock.training)
        return new

    def forward(  # noqa: D102
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        # torchvision's level rule (power-of-two levels), recomputed on every call.
        _, mapper = _setup_scales(features, image_shapes, self.canonical_scale, self.canonical_level)
        step = self.size_divisible
        padded = [math.ceil(max(shape[axis] for shape in image_shapes) / step) * step for axis in (0, 1)]
        rois = _convert_to_roi_format(boxes)
        levels = mapper(boxes) if len(features) > 1 else torch.zeros(len(rois), dtype=torch.int64)
        first = features[0]
        result = first.new_zeros((len(rois), first.shape[1], *self.output_size))
        for level, feature in enumerate(features):
            index = torch.where(levels == level)[0]
            scaled = rois[index].clone()
            scaled[:, 1::2] *= feature.shape[-1] / padded[1]  # x1, x2 by the columns' scale
            scaled[:, 2::2] *= feature.shape[-2] / padded[0]  # y1, y2 by the rows'
            pooled = roi_align(
                feature, scaled, output_size=self.output_size, spatial_scale=1.0, sampling_ratio=self.sampling_ratio
            )
            result[index] = pooled.to(result.dtype)
        return result


def use_float_strides(model: nn.Module) -> list[str]:
    """Replace ``model``'s stock torchvision anchor generators and RoI poolers (in place) by their float forms.

    RoI poolers are replaced only in a model with a ``GeneralizedRCNNTransform`` (its padding multiple
    says what the features cover).

    Returns:
        The module paths replaced, in ``named_modules`` order.
    """
    transform = next((m for m in model.modules() if isinstance(m, GeneralizedRCNNTransform)), None)
    replaced = []
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if type(module) is AnchorGenerator:
            new: nn.Module = FloatStrideAnchorGenerator.like(module)
        elif type(module) is MultiScaleRoIAlign and transform is not None:
            new = FloatScaleRoIAlign.like(module, transform.size_divisible)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        replaced.append(name)
    return replaced


def has_anchor_generator(model: nn.Module) -> bool:
    """Whether ``model`` holds a stock torchvision ``AnchorGenerator``."""
    return any(type(m) is AnchorGenerator for m in model.modules())
