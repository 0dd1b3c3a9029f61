"""Engine speed: converting torchvision ResNet-50 (trace, rewrite, tie, report) and its parts."""

from __future__ import annotations

import torch
import torchvision

from bench.common import Row, median_times
from dynoswap.engine import convert, trace


def run() -> list[Row]:
    model = torchvision.models.resnet50(num_classes=10)
    x = torch.randn(1, 3, 224, 224)
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(x)

    times = median_times(
        {
            "trace": lambda: trace(model),
            "convert": lambda: convert(model, (224, 224)),
            "convert_nocheck": lambda: convert(model, (224, 224), check=False),
            "forward": forward,
        },
        repeats=5,
        warmup=1,
    )
    group = "engine resnet50@224"
    return [
        Row(group, "convert (trace+rewrite+tie+report+probe)", times["convert"], "s", "< 1 s", times["convert"] < 1.0),
        Row(group, "convert, check=False", times["convert_nocheck"], "s"),
        Row(group, "fx trace alone", times["trace"], "s"),
        Row(group, "convert / one eval forward (batch 1)", times["convert"] / times["forward"], "x"),
    ]
