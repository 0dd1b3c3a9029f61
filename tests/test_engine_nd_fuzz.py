"""Fuzzing the engine in 1-D, 2-D and 3-D: tiny, odd and non-square sizes, ceil_mode, padding.

Each random stack either converts with the original geometry at the default scales (every DynOPool gives what
its resizers gave, where that is at least the 2-cell floor) and a loss equal to the count, or is refused with a
dynoswap error: never another exception.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dynoswap import convert, count_gmacs, gmacs_loss
from dynoswap.errors import DynoswapError, OptionError
from dynoswap.layers import DynOPoolNd

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MAX_POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVG_POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
GAP = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
MAX_SIDE = {1: 23, 2: 13, 3: 9}


@st.composite
def models(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...]]:
    """A conv/pool stack of 1, 2 or 3 axes with random strides, kernels, padding and ceil_mode, and an input size."""
    ndim = draw(st.sampled_from([1, 2, 3]))
    size = tuple(draw(st.integers(1, MAX_SIDE[ndim])) for _ in range(ndim))
    layers: list[nn.Module] = []
    chans = 2
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "max", "avg"]))
        kernel = draw(st.integers(1, 3))
        stride = draw(st.integers(1, 3))
        padding = draw(st.integers(0, kernel // 2))
        if kind == "conv":
            layers += [CONV[ndim](chans, 3, kernel, stride=stride, padding=padding), nn.ReLU()]
            chans = 3
        else:
            pool = MAX_POOL[ndim] if kind == "max" else AVG_POOL[ndim]
            layers.append(pool(kernel, stride=stride, padding=padding, ceil_mode=draw(st.booleans())))
    layers += [GAP[ndim](1), nn.Flatten(), nn.Linear(chans, 2)]
    return nn.Sequential(*layers), size


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(models())
def test_a_stack_converts_with_its_own_geometry_or_is_refused_by_type(case: tuple[nn.Module, tuple[int, ...]]) -> None:
    model, size = case
    x = torch.randn(2, 2, *size)
    try:
        model.eval()(x)
    except RuntimeError:  # the model itself refuses this size: convert must refuse it too, by type
        with pytest.raises(DynoswapError):
            convert(model, size)
        return
    try:
        gm, report = convert(model, size)
    except DynoswapError:
        return  # a typed refusal (e.g. an original output below the 2-cell floor)
    gm.eval()
    for row in report.replacements:
        pool = gm.get_submodule(row.dynopool)
        assert isinstance(pool, DynOPoolNd) and pool.ndim == len(size)
    sizes: dict[str, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, name=name: sizes.update({name: tuple(o.shape[2:])}) and None)
        for name, m in gm.named_modules()
        if isinstance(m, DynOPoolNd)
    ]
    try:
        assert gm(x).shape == (2, 2)
    finally:
        for h in hooks:
            h.remove()
    for row in report.replacements:
        original = row.original_out
        if original is not None and min(original) >= 2:  # below 2 a DynOPool gives its floor, and the row says so
            assert sizes[row.dynopool] == tuple(original), row
    try:
        loss = gmacs_loss(gm).item()
    except OptionError as err:  # a DynOPool at its 2-cell floor whatever its alpha: its cost follows no scale
        named = re.search(r"DynOPool '([^']+)' outputs its 2-cell floor", str(err))
        assert named is not None, err
        assert min(sizes[named.group(1)]) <= 2
        return
    assert loss == pytest.approx(count_gmacs(gm, size).total, rel=1e-9)
