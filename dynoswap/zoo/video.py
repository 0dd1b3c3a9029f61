"""A small 3-D CNN for video clips (N, C, T, H, W): the human-designed baseline of the built-in video set.

``video-tiny`` is a VGG-style C3D in miniature: a 3x3x3 conv-BN-ReLU per stage and an isotropic
``MaxPool3d(2)`` between stages, so time and space are halved together (the fixed design a learned
per-axis rate competes with), then global average pooling and one FC. With its three pools it needs
at least 8 frames and 8x8 pixels, and it takes any larger clip. At the default widths a forward of a
(3, 16, 32, 32) clip costs 23.4 MMACs (fvcore), so a few epochs of ``moving-bars`` train on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .checks import check_count, check_widths, scaled

#: Channels of the four stages at ``width=1``.
VIDEO_TINY_WIDTHS = (8, 16, 32, 64)


class VideoTiny(nn.Module):
    """Four stages of 3x3x3 conv-BN-ReLU with a 2x2x2 max pool between them, global average pooling, FC.

    Attributes:
        features: The convs and the three pools (``nn.Sequential``).
        pool: Global average pooling over (T, H, W).
        fc: The classifier.
    """

    def __init__(
        self, num_classes: int = 10, in_chans: int = 3, width: float = 1.0, widths: Sequence[int] = VIDEO_TINY_WIDTHS
    ) -> None:
        """Build the network.

        Args:
            num_classes: Classifier outputs.
            in_chans: Input channels.
            width: Multiplier of ``widths``.
            widths: Channels of each stage before ``width`` scales them; ``len(widths) - 1`` pools.
        """
        super().__init__()
        check_count("num_classes", num_classes)
        check_count("in_chans", in_chans)
        check_widths(widths)
        layers: list[nn.Module] = []
        cin = in_chans
        for i, cout in enumerate(scaled(widths, width)):
            if i:
                layers.append(nn.MaxPool3d(2))
            layers += [nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of a batch of clips (N, in_chans, T, H, W)."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def video_tiny(
    num_classes: int = 10, in_chans: int = 3, width: float = 1.0, widths: Sequence[int] = VIDEO_TINY_WIDTHS
) -> VideoTiny:
    """Build ``video-tiny``; see :class:`VideoTiny`."""
    return VideoTiny(num_classes, in_chans, width, widths)
