"""The CLI summary reports what a real forward pass and fvcore's count give."""

from __future__ import annotations

import pytest
import torch

from dynoswap.cli.summary import summarize
from dynoswap.cost import count_gmacs
from dynoswap.engine import convert
from dynoswap.layers import DynOPool2d
from dynoswap.models import resolve


def _forward_sizes(gm, size):
    """(name, in, out, leader) of each DynOPool, in call order, from one real forward pass."""
    seen = []
    pools = {m: n for n, m in gm.named_modules() if isinstance(m, DynOPool2d)}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out: seen.append((mod, tuple(inp[0].shape[-2:]), tuple(out.shape[-2:])))
        )
        for m in pools
    ]
    with torch.no_grad():
        gm.eval()(torch.zeros(1, 3, *size))
    for h in hooks:
        h.remove()
    return [(pools[m], list(i), list(o), pools[m.leader]) for m, i, o in seen]


@pytest.mark.parametrize(
    ("spec", "size", "sizes"),
    [
        ("resnet18", (64, 64), [(20, 18), (10, 9), (5, 5), (3, 2)]),
        ("mobilenet_v2", (64, 48), None),
        ("timm:efficientnet_b0", (48, 64), None),
    ],
)
def test_summary_of_a_converted_model_matches_a_forward_pass(spec, size, sizes):
    torch.manual_seed(0)
    model, _ = resolve(spec, num_classes=10)
    gm, _ = convert(model.eval(), input_size=size, sizes=sizes)
    summary = summarize(gm, size, spec, "torchvision")
    assert summary.gmacs == pytest.approx(count_gmacs(gm, size).total, rel=1e-9)
    observed = _forward_sizes(gm, size)
    assert [(r["name"], r["in"], r["out"], r["group"]) for r in summary.dynopools] == observed
    # Stages: the input, then each tie group's output once per input resolution, in call order.
    expected, seen = [size], set()
    for _, in_size, out_size, leader in observed:
        if (leader, tuple(in_size)) not in seen:
            seen.add((leader, tuple(in_size)))
            expected.append(tuple(out_size))
    assert summary.stages == expected
    if sizes:
        assert summary.stages[1:] == sizes


@pytest.mark.parametrize(
    ("spec", "size", "stages"),
    [
        ("resnet18", (64, 64), [(64, 64), (16, 16), (8, 8), (4, 4), (2, 2)]),
        ("vgg11", (40, 56), [(40, 56), (20, 28), (10, 14), (5, 7), (2, 3), (1, 1)]),  # pools floor
    ],
)
def test_summary_of_a_plain_model_lists_its_resizers_stages(spec, size, stages):
    model, _ = resolve(spec, num_classes=10)
    summary = summarize(model.eval(), size, spec, "torchvision")
    assert summary.stages == stages
    assert summary.dynopools == []
    assert summary.gmacs == pytest.approx(count_gmacs(model, size).total, rel=1e-12)
