"""The CLI's one-pass summary of a converted model agrees with dynoswap.cost's resolution graph."""

from __future__ import annotations

import pytest
import torch

from dynoswap.cli.summary import counted_with_dynopools, plain_stage_sizes
from dynoswap.cost import alphas, count_gmacs, stage_sizes
from dynoswap.engine import convert
from dynoswap.models import resolve


@pytest.mark.parametrize(
    ("spec", "size", "sizes"),
    [
        ("resnet18", (64, 64), [(20, 18), (10, 9), (5, 5), (3, 2)]),
        ("mobilenet_v2", (64, 48), None),
        ("timm:efficientnet_b0", (48, 64), None),
    ],
)
def test_one_pass_summary_matches_resolution_graph(spec, size, sizes):
    torch.manual_seed(0)
    model, _ = resolve(spec, num_classes=10)
    gm, _ = convert(model.eval(), input_size=size, sizes=sizes)
    count, stages, rows = counted_with_dynopools(gm, size)
    assert stages == stage_sizes(gm, size)
    assert count.total == pytest.approx(count_gmacs(gm, size).total, rel=1e-12)
    reference = alphas(gm, size)
    assert [r["name"] for r in rows] == [r["name"] for r in reference]
    for mine, ref in zip(rows, reference, strict=True):
        assert mine["in"] == list(ref["in_size"]) and mine["out"] == list(ref["out_size"])
        assert mine["group"] == ref["group"]
        assert mine["scale"] == pytest.approx(ref["scale"])
    if sizes:
        assert stages[1:] == sizes


@pytest.mark.parametrize(("spec", "size"), [("resnet18", (64, 64)), ("mobilenet_v2", (64, 48)), ("vgg11", (40, 56))])
def test_plain_stage_sizes_match_cost(spec, size):
    model, _ = resolve(spec, num_classes=10)
    assert plain_stage_sizes(model.eval(), size) == stage_sizes(model, size)
