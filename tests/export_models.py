"""Converted models with every tie group moved to its own random scales, shared by the freeze/export tests."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import fx

import dynoswap
from dynoswap.layers import DynOPool2d


@dataclass(frozen=True)
class Case:
    """A model to freeze and export: how to build and convert it, and its output tensor."""

    name: str
    build: Callable[[], torch.nn.Module]
    input_size: tuple[int, int]
    placement: str = "post"
    output: Callable[[Any], torch.Tensor] = lambda out: out


def _timm(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)

    return build


def _tv(name: str, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    return lambda: torchvision.models.get_model(name, weights=None, **kwargs)


CASES = {
    c.name: c
    for c in [
        Case("resnet18", _tv("resnet18", num_classes=10), (64, 56)),
        Case("mobilenet_v3_small", _tv("mobilenet_v3_small", num_classes=10), (64, 64)),
        Case("efficientnet_b0", _tv("efficientnet_b0", num_classes=10), (64, 64)),
        # No stochastic depth: the traced graph keeps the training flag it was traced with.
        Case("convnext_tiny", _tv("convnext_tiny", num_classes=10, stochastic_depth_prob=0.0), (64, 64)),
        Case("hrnet_w18_small", _timm("hrnet_w18_small"), (64, 64)),
        Case(
            "deeplabv3_mobilenet_v3_large",
            _tv("deeplabv3_mobilenet_v3_large", weights_backbone=None, num_classes=3, aux_loss=False),
            (64, 48),
            placement="pre",
            output=lambda out: out["out"],
        ),
    ]
}


def move_every_group(gm: fx.GraphModule, seed: int) -> list[tuple[float, float]]:
    """Give each tie group its own scales, each axis drawn separately: some down, some up, never one factor."""
    rng = random.Random(seed)
    leaders = [m for m in gm.modules() if isinstance(m, DynOPool2d) and m.leader is m]
    scales = []
    for i, layer in enumerate(leaders):
        up_axis = i % 2  # alternate which axis (if any) upsamples, so both directions and axes occur
        pair = [rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)]
        if i % 3 != 2:
            pair[up_axis] = rng.uniform(1.05, 1.45)
        layer.set_scale(tuple(pair))
        scales.append(layer.scale)
    return scales


@functools.cache
def moved(name: str, seed: int = 0) -> fx.GraphModule:
    """The case converted scales moved, in eval mode; build once per session."""
    case = CASES[name]
    torch.manual_seed(seed)
    model = case.build()
    gm, _ = dynoswap.convert(model, case.input_size, placement=case.placement, check=False)
    move_every_group(gm, seed)
    return gm.eval()
