"""Cost: gmacs_loss speed (ResNet-50, CPU) and DynOPool's share of the count (supplement Table 3)."""

from __future__ import annotations

import time

import torch
import torchvision

from bench.common import Row, median_times
from dynoswap.cost import count_gmacs, gmacs_loss, resolution_graph
from dynoswap.engine import convert

SIZE = (224, 224)
#: Supplement Table 3 (ImageNet column): DynOPool's share of the converted model's GMACs, percent.
PAPER_SHARE = {"vgg16": 0.07, "resnet50": 0.26, "mobilenet_v2": 3.86}
#: fvcore's figures for the original models at 224, 1000 classes (the paper's human-designed rows).
PAPER_GMACS = {"vgg16": 15.4, "resnet50": 4.11, "mobilenet_v2": 0.31}


def _loss_rows(gm: torch.nn.Module) -> list[Row]:
    start = time.perf_counter()
    resolution_graph(gm)  # recorded once (two shape passes and one count), outside the loss timing
    record = time.perf_counter() - start

    def forward() -> None:
        gmacs_loss(gm)

    def forward_backward() -> None:
        gmacs_loss(gm).backward()

    def fvcore() -> None:
        count_gmacs(gm, SIZE)

    times = median_times({"loss": forward, "loss+backward": forward_backward}, repeats=50, warmup=5)
    slow = median_times({"loss": forward, "count": fvcore}, repeats=3, warmup=1)
    return [
        Row("cost", "gmacs_loss resnet50", times["loss"] * 1e3, "ms", "< 2 ms", times["loss"] < 2e-3),
        Row("cost", "gmacs_loss+backward resnet50", times["loss+backward"] * 1e3, "ms"),
        Row("cost", "count_gmacs / gmacs_loss time", slow["count"] / slow["loss"], "x"),
        Row("cost", "record resolution graph resnet50 (once)", record, "s"),
        Row("cost", "record / count_gmacs time", record / slow["count"], "x"),
    ]


def run() -> list[Row]:
    """Time the loss on converted ResNet-50; count the three paper models, original and converted."""
    rows: list[Row] = []
    for name in ("resnet50", "mobilenet_v2", "vgg16"):
        model = getattr(torchvision.models, name)(num_classes=1000)
        original = count_gmacs(model, SIZE).total
        rows.append(Row("cost", f"{name} GMACs (original)", original, "G", f"paper {PAPER_GMACS[name]}"))
        gm, _ = convert(model, input_size=SIZE)
        count = count_gmacs(gm, SIZE)
        rows.append(Row("cost", f"{name} GMACs (converted)", count.total, "G"))
        share = 100 * count.dynopool_share
        rows.append(Row("cost", f"{name} DynOPool share", share, "%", f"paper {PAPER_SHARE[name]}"))
        if name == "resnet50":
            rows += _loss_rows(gm)
        del model, gm
    return rows
