"""The networks the DynOPool paper trained (supplement 1.1: Shape Adaptor's architectures, one FC head).

Two forms of each backbone:

- ImageNet / FGVC-Aircraft (224x224): VGG-16 with BatchNorm and 4 max pools (the 5 listed
  stages of Table 1: 224, 112, 56, 28, 14), then global average pooling and one FC;
  torchvision's ResNet-50 and MobileNetV2 (their heads already are one FC).
- CIFAR (32x32): the same VGG-16 (4 pools: 32, 16, 8, 4, 2); ResNet-50 with a 3x3 stride-1
  stem and no max pool (32, 16, 8, 4); MobileNetV2 with a stride-1 stem and its first
  stride-2 block at stride 1 (32, 16, 8, 4).

State-dict keys follow torchvision's ``vgg16_bn``, ``resnet50`` and ``mobilenet_v2`` wherever the
layers are the same (the VGG's ``features.N`` indices included), so a torchvision checkpoint loads
into every layer but the changed head and stem.
"""

from __future__ import annotations

import torch
from torch import nn

#: VGG-16's convolution widths; "M" is a 2x2 max pool. The paper keeps 4 of torchvision's 5 pools.
VGG16_LAYERS: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
)

#: MobileNetV2's inverted-residual stages (expansion t, channels c, blocks n, first stride s), as torchvision's.
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class PaperVGG(nn.Module):
    """VGG-16 with BatchNorm, 4 max pools, global average pooling and one FC.

    Attributes:
        features: Conv-BN-ReLU layers and pools, indexed as torchvision's ``vgg16_bn.features``.
        avgpool: Global average pooling.
        classifier: The single FC layer.
    """

    def __init__(self, num_classes: int = 1000, in_chans: int = 3) -> None:
        """Build the network.

        Args:
            num_classes: Classifier outputs.
            in_chans: Input channels.
        """
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_chans
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            width = int(item)
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features, global average pooling, the FC."""
        x = self.avgpool(self.features(x))
        return self.classifier(x.flatten(1))


def vgg16(num_classes: int = 1000, in_chans: int = 3) -> PaperVGG:
    """Build the paper's VGG-16 (ImageNet/Aircraft and CIFAR alike: the input size sets the stages)."""
    return PaperVGG(num_classes, in_chans)


def vgg16_cifar(num_classes: int = 100, in_chans: int = 3) -> PaperVGG:
    """Build the paper's VGG-16 for CIFAR: the same layers; at 32x32 its stages are 32, 16, 8, 4, 2."""
    return PaperVGG(num_classes, in_chans)


def resnet50(num_classes: int = 1000) -> nn.Module:
    """Build torchvision's ResNet-50: 7x7 stride-2 stem, max pool, 4 stages, one FC."""
    from torchvision.models import resnet50 as tv_resnet50

    return tv_resnet50(num_classes=num_classes)


def resnet50_cifar(num_classes: int = 100) -> nn.Module:
    """Build ResNet-50 for 32x32 inputs: a 3x3 stride-1 stem and no max pool, so layer1 runs at full size."""
    model = resnet50(num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def _mobilenet_v2(num_classes: int, stages: tuple[tuple[int, int, int, int], ...], stem_stride: int) -> nn.Module:
    from torchvision.models import MobileNetV2
    from torchvision.ops.misc import Conv2dNormActivation

    model = MobileNetV2(num_classes=num_classes, inverted_residual_setting=[list(s) for s in stages])
    if stem_stride != 2:
        stem = Conv2dNormActivation(3, 32, stride=stem_stride, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU6)
        nn.init.kaiming_normal_(stem[0].weight, mode="fan_out")
        model.features[0] = stem
    return model


def mobilenet_v2(num_classes: int = 1000) -> nn.Module:
    """Build torchvision's MobileNetV2 (stages 224, 112, 56, 28, 14, 7; dropout + one FC)."""
    return _mobilenet_v2(num_classes, MOBILENET_V2_STAGES, stem_stride=2)


def mobilenet_v2_cifar(num_classes: int = 100) -> nn.Module:
    """Build MobileNetV2 for 32x32 inputs: stride-1 stem, the first stride-2 block (24 channels) at stride 1."""
    stages = tuple((t, c, n, 1 if c == 24 else s) for t, c, n, s in MOBILENET_V2_STAGES)
    return _mobilenet_v2(num_classes, stages, stem_stride=1)


#: (zoo name, factory, description, keyword arguments) of every paper network.
PAPER_MODELS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("paper:vgg16", "vgg16", "the paper's VGG-16 with BN, 4 pools, one FC (ImageNet/Aircraft, 224)", ("num_classes",)),
    ("paper:resnet50", "resnet50", "the paper's ResNet-50 (torchvision's; ImageNet/Aircraft, 224)", ("num_classes",)),
    ("paper:mobilenet_v2", "mobilenet_v2", "the paper's MobileNetV2 (torchvision's; 224)", ("num_classes",)),
    ("paper:vgg16-cifar", "vgg16_cifar", "the paper's VGG-16 for CIFAR: BN, 4 pools, one FC (32)", ("num_classes",)),
    ("paper:resnet50-cifar", "resnet50_cifar", "ResNet-50 for CIFAR: 3x3 stride-1 stem, no max pool", ("num_classes",)),
    (
        "paper:mobilenet_v2-cifar",
        "mobilenet_v2_cifar",
        "MobileNetV2 for CIFAR: stride-1 stem and first stride-2 block",
        ("num_classes",),
    ),
    (
        "paper:hrnet_w48-seg",
        "hrnet_w48_seg",
        "HRNet-W48 (timm) with the HRNetV2 segmentation head (Table 4, PascalVOC, 480)",
        ("num_classes",),
    ),
)


def register_paper_models() -> None:
    """Register the paper's networks in the zoo (called by ``dynoswap.zoo``'s built-in registration)."""
    from . import register_model

    for name, fn, description, kwargs in PAPER_MODELS:
        register_model(name, f"dynoswap.zoo.paper:{fn}", description=description, arch_kwargs=kwargs)


class HRNetSegmentation(nn.Module):
    """HRNet-W48 with the HRNetV2 segmentation head (Table 4's network).

    The four streams of timm's ``hrnet_w48`` (without its classification increments) are
    upsampled to the highest stream's size, concatenated (720 channels), mixed by a 1x1
    conv-BN-ReLU and classified per pixel by a 1x1 conv; logits are upsampled to the input.

    Attributes:
        backbone: timm ``hrnet_w48`` feature extractor (``feature_location=''``).
        head: 1x1 conv-BN-ReLU, 1x1 classifier conv.
    """

    def __init__(self, num_classes: int = 21, width: int = 48) -> None:
        """Build the network.

        Args:
            num_classes: Classes per pixel (PascalVOC: 21).
            width: HRNet width (48: the four streams have 48, 96, 192 and 384 channels).
        """
        super().__init__()
        import timm

        self.backbone = timm.create_model(
            f"hrnet_w{width}", features_only=True, feature_location="", out_indices=(1, 2, 3, 4), pretrained=False
        )
        channels = sum(self.backbone.feature_info.channels())  # type: ignore[union-attr,operator]
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Streams, upsampled and concatenated, the head, logits at the input size."""
        import torch.nn.functional as F

        streams = self.backbone(x)
        size = streams[0].shape[-2:]
        up = [streams[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in streams[1:]]
        logits = self.head(torch.cat(up, 1))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def hrnet_w48_seg(num_classes: int = 21) -> HRNetSegmentation:
    """Build HRNet-W48 with the HRNetV2 segmentation head (PascalVOC: 21 classes, 480x480 crops in Table 4)."""
    return HRNetSegmentation(num_classes)
