"""Training robustness across CNN families (``make sweep``): brief runs with a lambda and with a budget.

Each model is converted at 32x32, then trained on ``barcodes`` twice for 3 short epochs: once with a
lambda, once with a budget. Every run must finish; after every epoch every alpha is finite and no
DynOPool outputs more cells than its input has (the default bounds); a budget lands within 3% of its
target in real GMACs or is refused (``BudgetError``) before any step; and no run's validation accuracy
collapses (falls more than 10 points below its first epoch's: on 12 steps from random weights, smaller
moves are noise).
"""

from __future__ import annotations

import math

import pytest
import torch

from dynoswap.cost import count_gmacs
from dynoswap.engine import convert
from dynoswap.errors import BudgetError
from dynoswap.models import ModelSource
from dynoswap.train import fit, load_data, make_loaders

pytestmark = pytest.mark.slow

MODELS = [
    ("torchvision", "resnet18"),
    ("torchvision", "mobilenet_v2"),
    ("torchvision", "mobilenet_v3_small"),
    ("torchvision", "efficientnet_b0"),
    ("torchvision", "regnet_x_400mf"),
    ("torchvision", "shufflenet_v2_x0_5"),
    ("timm", "resnet18d"),
    ("timm", "mobilenetv3_small_050"),
    ("timm", "convnext_atto"),
    ("timm", "lcnet_050"),
]


def _check_epoch(record) -> None:
    for pool in record["pools"]:
        assert all(math.isfinite(a) and a > 0 for a in pool["alpha"]), pool
        assert pool["out"][0] <= pool["in"][0] and pool["out"][1] <= pool["in"][1], pool


@pytest.mark.parametrize("mode", ["lambda", "budget"])
@pytest.mark.parametrize("spec", MODELS, ids=[f"{lib}:{name}" for lib, name in MODELS])
def test_brief_training_stays_in_bounds_lands_and_does_not_collapse(spec, mode):
    bundle = load_data("barcodes", seed=0)
    torch.manual_seed(0)
    source = ModelSource(spec[0], spec[1], {"num_classes": bundle.num_classes})
    gm, _ = convert(source.build(), bundle.input_size, source=source)
    train, val = make_loaders(bundle, 32, seed=0)
    g0 = count_gmacs(gm, bundle.input_size).total
    kwargs = {"epochs": 3, "max_steps": 4, "lr": 0.02, "input_size": bundle.input_size, "progress": False}
    if mode == "lambda":
        records = fit(gm, train, val, lam=0.3 / g0, on_epoch_end=_check_epoch, **kwargs)
    else:
        target = 0.6 * g0
        before = {k: v.clone() for k, v in gm.state_dict().items()}
        try:
            records = fit(gm, train, val, target_gmacs=target, on_epoch_end=_check_epoch, **kwargs)
        except BudgetError as refused:  # refused before any step: nothing moved
            assert "out of reach" in str(refused)
            assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())
            return
        final = count_gmacs(gm, bundle.input_size).total
        assert abs(final / target - 1) <= 0.03, (final, target)
    assert len(records) == 3
    assert records[-1]["val_acc"] >= records[0]["val_acc"] - 0.10, [r["val_acc"] for r in records]
