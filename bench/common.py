"""Shared timing helpers: interleaved repeats so noise hits every contender alike."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Row:
    """One line of the bench table."""

    group: str
    name: str
    value: float
    unit: str
    target: str = ""
    ok: bool | None = None


def median_times(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin in one run."""
    return {k: statistics.median(v) for k, v in _samples(fns, repeats, warmup).items()}


def best_times(fns: dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 2) -> dict[str, float]:
    """Fastest seconds per call of each function, round-robin in one run: on a loaded machine noise only adds."""
    return {k: min(v) for k, v in _samples(fns, repeats, warmup).items()}


def _samples(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[key].append(time.perf_counter() - start)
    return samples
