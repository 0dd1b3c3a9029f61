"""Latency tables: how well a table predicts measured latency, and the 0.6x latency goal for resnet18.

Each case is converted at 224x224, profiled (:func:`dynoswap.cost.latency.profile`: per-layer
curves, 8 calibration settings, 20 held-out settings; batch 1, one thread, best of 5) and the
held-out error is reported. For resnet18, every tie group's alpha is then scaled by one common
factor until the table predicts 0.6x the original's measured latency on the same backend, and the
deployed frozen model is measured against the original (goal: <= 0.65x).
"""

from __future__ import annotations

import os

import torch
import torchvision

from bench.common import Row
from dynoswap import convert
from dynoswap.cost.latency import lookup_backend, measure_model, predict_latency, profile
from dynoswap.layers import DynOPool2d

SIZE = (224, 224)
CASES = (
    ("resnet18", "post", "eager"),
    ("resnet18", "pre", "eager"),
    ("mobilenet_v2", "post", "eager"),
    ("resnet50", "post", "eager"),
    ("resnet18", "post", "onnxruntime"),
)
GOAL_ERROR = 0.15
GOAL_RATIO = 0.65


def _goal_rows(group: str, model: torch.nn.Module, original: torch.nn.Module, table, backend) -> list[Row]:
    leaders = [m for m in model.modules() if isinstance(m, DynOPool2d) and m.leader is m]
    base = [m.alpha.detach().clone() for m in leaders]
    x = torch.randn(1, 3, *SIZE)

    def set_factor(factor: float) -> None:
        with torch.no_grad():
            for layer, alpha in zip(leaders, base, strict=True):
                layer.alpha.copy_(alpha * factor)

    original_ms = backend.time_op(original, x, 9)
    low, high = 0.25, 4.0
    for _ in range(30):
        mid = (low + high) / 2
        set_factor(mid)
        if predict_latency(model, table, SIZE) > 0.6 * original_ms:
            low = mid
        else:
            high = mid
    set_factor(high)
    predicted = predict_latency(model, table, SIZE)
    measured = measure_model(model, backend, SIZE, 1, 9)
    original_ms = min(original_ms, backend.time_op(original, x, 9))
    set_factor(1.0)
    ratio = measured / original_ms
    return [
        Row(group, "set to 0.6x predicted: predicted / original", predicted / original_ms, "x"),
        Row(group, "set to 0.6x predicted: measured / original", ratio, "x", f"<= {GOAL_RATIO}", ratio <= GOAL_RATIO),
    ]


def run() -> list[Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name, placement, backend_name in CASES:
            group = f"latency table {name} {placement} {backend_name}"
            try:
                backend = lookup_backend(backend_name)
            except ValueError as exc:
                rows.append(Row(group, f"skipped: {exc}", 0.0, ""))
                continue
            torch.manual_seed(0)
            original = torchvision.models.get_model(name).eval()
            model, _ = convert(original, SIZE, placement=placement)
            model.eval()
            result = profile(model, SIZE, backend=backend_name, repeats=5, calibrate=8, validate=20, name=name)
            check = result.table.validation or {}
            median = check["median_abs_error"]
            rows.append(Row(group, "held-out settings", check["settings"], ""))
            rows.append(Row(group, "median abs error", median, "", f"<= {GOAL_ERROR}", median <= GOAL_ERROR))
            rows.append(Row(group, "max abs error", check["max_abs_error"], ""))
            if name == "resnet18" and not os.environ.get("DYNOSWAP_BENCH_LATENCY_NO_GOAL"):
                rows += _goal_rows(group, model, original, result.table, backend)
    finally:
        torch.set_num_threads(threads)
    return rows
