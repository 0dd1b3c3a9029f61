"""Engine speed: converting ResNet-50, HRNet-W18-small and RegNetY-032 (trace, rewrite, tie discovery, report)."""

from __future__ import annotations

import torch
import torchvision

from bench.common import Row, median_times
from dynoswap.engine import convert, trace


def _timm(name: str) -> torch.nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


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
            "forward": forward,
        },
        repeats=5,
        warmup=1,
    )
    group = "engine resnet50@224"
    rows = [
        Row(
            group,
            "convert (trace+rewrite+tie discovery+report)",
            times["convert"],
            "s",
            "< 1.5 s",
            times["convert"] < 1.5,
        ),
        Row(group, "fx trace alone", times["trace"], "s"),
        Row(group, "convert / one eval forward (batch 1)", times["convert"] / times["forward"], "x"),
    ]
    for name in ("hrnet_w18_small", "regnety_032"):
        other = _timm(name)
        t = median_times({"convert": lambda other=other: convert(other, (224, 224))}, repeats=3, warmup=1)
        rows.append(Row(f"engine {name}@224", "convert", t["convert"], "s"))
    return rows
