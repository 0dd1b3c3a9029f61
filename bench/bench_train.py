"""Training step speed: converted ResNet-18 (task + lambda * GMACs loss) against the original, and where time goes.

One step = forward, cross-entropy (+ eq. 7 for the converted model), backward, SGD
step, as ``dynoswap.train.fit`` does it. Both models are timed round-robin in one
run at 64x64, batch 8, on CPU; the profiler table lists the converted step's top ops.
"""

from __future__ import annotations

import torch
import torchvision

from bench.bench_step import step_fn
from bench.common import Row, median_times

INPUT = (64, 64)
BATCH = 8


def _models():
    from dynoswap.engine import convert

    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10)
    gm, _ = convert(original, INPUT)
    return original, gm


def profile_table(step, rows: int = 12) -> tuple[str, list[tuple[str, float]]]:
    """Profiler table of a few steps and the top ops' share of self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    averages = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in averages) or 1.0
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    shares = [(e.key, e.self_cpu_time_total / total) for e in top]
    return averages.table(sort_by="self_cpu_time_total", row_limit=rows), shares


def run() -> list[Row]:
    original, gm = _models()
    steps = {
        "original": step_fn(original, original, False, INPUT, BATCH),
        "converted": step_fn(gm, gm, True, INPUT, BATCH),
    }
    times = median_times(steps, repeats=5, warmup=1)
    table, shares = profile_table(steps["converted"])
    print(f"converted resnet18 training step at {INPUT[0]}x{INPUT[1]}, batch {BATCH}: top ops by self CPU time")
    print(table)
    rows = [
        Row("train", "resnet18 original steps/s", 1.0 / times["original"], "steps/s"),
        Row("train", "resnet18 converted steps/s", 1.0 / times["converted"], "steps/s"),
        Row("train", "converted / original step time", times["converted"] / times["original"], "x"),
    ]
    for name, share in shares[:5]:
        rows.append(Row("train profile", f"converted: {name}", 100 * share, "% self CPU"))
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
