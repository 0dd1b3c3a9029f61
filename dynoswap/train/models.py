"""A small CIFAR-style VGG: the human-designed baseline of the built-in experiments.

Registered in the zoo as ``vgg-tiny`` (:mod:`dynoswap.zoo`), so saved models name it
without naming any code.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..zoo.checks import check_count, check_widths


def small_vgg(
    num_classes: int = 10, in_chans: int = 3, widths: Sequence[int] = (16, 32, 64, 64), convs_per_stage: int = 1
) -> nn.Sequential:
    """VGG-style CNN: per stage ``convs_per_stage`` x (conv3x3-BN-ReLU), then 2x2 max pooling.

    The last stage has no pooling; global average pooling and a linear classifier
    follow. Converting it turns each ``MaxPool2d`` into one DynOPool2d.

    Args:
        num_classes: Classifier outputs.
        in_chans: Input channels.
        widths: Channels of each stage; ``len(widths) - 1`` pooling layers.
        convs_per_stage: Convolutions per stage.
    """
    for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("convs_per_stage", convs_per_stage)):
        check_count(name, value)
    check_widths(widths)
    layers: list[nn.Module] = []
    channels = in_chans
    for i, width in enumerate(widths):
        for _ in range(convs_per_stage):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True)]
            channels = width
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    return nn.Sequential(*layers)
