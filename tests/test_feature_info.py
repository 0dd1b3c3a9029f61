"""timm features_only models: feature_info reductions after conversion and after the scales move."""

from __future__ import annotations

import pytest
import timm
import torch

from dynoswap.engine import convert
from dynoswap.engine.features import LearnedFeatureInfo
from dynoswap.layers import DynOPool2d

SIDE = 64


@pytest.fixture
def extractor():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", features_only=True, pretrained=False, out_indices=(1, 2, 3, 4))
    gm, report = convert(model, (SIDE, SIDE))
    return model, gm, report


def _measured(gm) -> list[tuple[float, float]]:
    gm.eval()
    with torch.no_grad():
        maps = gm(torch.zeros(1, 3, SIDE, SIDE))
    return [(SIDE / m.shape[-2], SIDE / m.shape[-1]) for m in maps]


def test_a_converted_extractor_reports_the_original_reductions(extractor) -> None:
    model, gm, _ = extractor
    info = gm.feature_info
    assert isinstance(info, LearnedFeatureInfo)
    assert info.reduction() == model.feature_info.reduction() == [4, 8, 16, 32]
    assert info.channels() == model.feature_info.channels() == [64, 128, 256, 512]
    assert info.module_name() == model.feature_info.module_name()


def test_reductions_follow_moved_scales_and_a_training_step(extractor) -> None:
    _, gm, report = extractor
    leaders = [gm.get_submodule(group[0]) for group in report.groups]  # in execution order
    assert all(isinstance(p, DynOPool2d) and p.leader is p for p in leaders)
    # One group per stage: the stem (conv and max pool merged), then layer2-4's first blocks.
    assert len(leaders) == report.num_alphas == 4
    assert gm.feature_info.reduction() == [4, 8, 16, 32]  # measured once at the conversion's scales
    scales = [(0.3, 0.2), (0.55, 0.42), (0.6, 0.55), (0.43, 0.58)]
    for pool, scale in zip(leaders, scales, strict=True):
        pool.set_scale(scale)
    # The size rule by hand: n -> floor(n * r + 1/2), per axis, stage after stage.
    rows, cols, expected = SIDE, SIDE, []
    for r_h, r_w in scales:
        rows, cols = int(rows * r_h + 0.5), int(cols * r_w + 0.5)
        expected.append((SIDE / rows, SIDE / cols))
    assert expected == [(SIDE / 19, SIDE / 13), (SIDE / 10, SIDE / 5), (SIDE / 6, SIDE / 3), (SIDE / 3, SIDE / 2)]
    assert _measured(gm) == expected
    assert gm.feature_info.get("reduction_hw") == expected
    assert gm.feature_info.reduction() == [64 / 19, 6.4, 64 / 6, 64 / 3]
    # A training step moves the alphas: the next read measures again.
    gm.train()
    optimizer = torch.optim.SGD([p.alpha for p in leaders], lr=0.1)
    loss = sum(m.mean() for m in gm(torch.rand(2, 3, SIDE, SIDE)))
    loss.backward()
    before = [p.alpha.detach().clone() for p in leaders]
    optimizer.step()
    assert any(not torch.equal(b, p.alpha) for b, p in zip(before, leaders, strict=True))
    assert gm.feature_info.get("reduction_hw") == _measured(gm)
