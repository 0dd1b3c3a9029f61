"""1-D CNNs for raw waveforms, spectrograms and time series (torchaudio has no release for torch 2.14).

- ``m5``: the M5 raw-waveform CNN of Dai et al. 2017 ("Very deep convolutional neural networks
  for raw waveforms"): a wide strided first convolution, three 3-tap convolutions, a max pool of 4
  after each of the four, global average pooling and one FC. Its total reduction is 4 * 4**4 = 1024,
  so it needs an input of at least 1024 samples.
- ``resnet1d``: a ResNet of 1-D basic blocks (torchvision's ResNet-18 layout with ``Conv1d``):
  stem conv7 stride 2 and max pool 3/2, four stages whose stages 2-4 start with a stride-2 block
  (1x1 strided downsample on the shortcut), global average pooling and one FC. It runs at any
  length >= 1 (reduction 32).

Both are plain ``nn`` modules without data-dependent control flow, so ``torch.fx`` traces them,
and both end in adaptive average pooling, so they take any length above their minimum.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .checks import check_count, scaled

#: M5's channels after the stem and each of its three 3-tap convolutions (the paper's widths).
M5_WIDTHS = (128, 128, 256, 512)

#: ResNet-18's channels per stage; ``width`` scales them.
RESNET1D_WIDTHS = (64, 128, 256, 512)


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0) -> list[nn.Module]:
    return [nn.Conv1d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]


class M5(nn.Module):
    """M5 (Dai et al. 2017): conv 80/4 and three 3-tap convs, each followed by BN, ReLU and a max pool of 4.

    The stem is padded by 38 and each 3-tap conv by 1, so an input of length ``L`` (a multiple of
    1024) has lengths L/4, L/16, L/64, L/256 and L/1024 after the stem and each pool.

    Attributes:
        features: The four conv-BN-ReLU-pool blocks (``nn.Sequential``).
        pool: Global average pooling.
        fc: The classifier.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: float = 1.0) -> None:
        """Build the network.

        Args:
            num_classes: Classifier outputs.
            in_chans: Input channels (1 for a mono waveform).
            width: Multiplier of the paper's channels (128, 128, 256, 512).
        """
        super().__init__()
        check_count("num_classes", num_classes)
        check_count("in_chans", in_chans)
        c = scaled(M5_WIDTHS, width)
        layers = [*_conv_bn_relu(in_chans, c[0], 80, stride=4, padding=38), nn.MaxPool1d(4)]
        for cin, cout in zip(c, c[1:], strict=False):
            layers += [*_conv_bn_relu(cin, cout, 3, padding=1), nn.MaxPool1d(4)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(c[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of a batch (N, in_chans, L), L >= 1024."""
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock1d(nn.Module):
    """ResNet's basic block in 1-D: two 3-tap conv-BN, a shortcut (1x1 strided conv-BN when it resizes), ReLU.

    Attributes:
        conv1, bn1, conv2, bn2: The residual branch (``conv1`` carries the stride).
        downsample: 1x1 conv and BN on the shortcut, or None when the shape is kept.
        relu: Shared ReLU.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        """Build the block.

        Args:
            cin: Input channels.
            cout: Output channels.
            stride: Stride of the first conv (and of the shortcut).
        """
        super().__init__()
        self.conv1 = nn.Conv1d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm1d(cout)
        self.conv2 = nn.Conv1d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm1d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv1d(cin, cout, 1, stride, bias=False), nn.BatchNorm1d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual branch plus shortcut, then ReLU."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet1d(nn.Module):
    """A 1-D ResNet of basic blocks: stem conv7/2 and max pool 3/2, four stages (stride 2 from stage 2), FC.

    Attributes:
        conv1, bn1, relu, maxpool: The stem (reduction 4).
        layer1, layer2, layer3, layer4: The stages; the first block of stages 2-4 has stride 2.
        avgpool: Global average pooling.
        fc: The classifier.
    """

    def __init__(
        self, num_classes: int = 10, in_chans: int = 1, width: float = 1.0, layers: Sequence[int] = (2, 2, 2, 2)
    ) -> None:
        """Build the network.

        Args:
            num_classes: Classifier outputs.
            in_chans: Input channels (1 for a waveform or series, the frequency bins for a spectrogram).
            width: Multiplier of ResNet-18's channels (64, 128, 256, 512).
            layers: Blocks in each of the four stages.
        """
        super().__init__()
        check_count("num_classes", num_classes)
        check_count("in_chans", in_chans)
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) != 4:
            raise ValueError(f"layers must be 4 block counts (one per stage), got {layers!r}")
        for blocks in layers:
            check_count("a stage's block count", blocks)
        c = scaled(RESNET1D_WIDTHS, width)
        self.conv1 = nn.Conv1d(in_chans, c[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm1d(c[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool1d(3, 2, 1)
        stages: list[nn.Sequential] = []
        cin = c[0]
        for i, (cout, blocks) in enumerate(zip(c, layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock1d(cin, cout, stride)] + [BasicBlock1d(cout, cout) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) of a batch (N, in_chans, L)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def m5(num_classes: int = 10, in_chans: int = 1, width: float = 1.0) -> M5:
    """Build M5 (zoo name ``m5``); see :class:`M5`."""
    return M5(num_classes, in_chans, width)


def resnet1d(
    num_classes: int = 10, in_chans: int = 1, width: float = 1.0, layers: Sequence[int] = (2, 2, 2, 2)
) -> ResNet1d:
    """Build a 1-D ResNet (zoo name ``resnet1d``; the default ``layers`` are ResNet-18's); see :class:`ResNet1d`."""
    return ResNet1d(num_classes, in_chans, width, layers)
