"""count_gmacs on 1-D and 3-D models: fvcore's Conv1d/Conv3d counts and DynOPool1d/3d at 4**d per output."""

from __future__ import annotations

import pytest
from torch import nn

from dynoswap import DynOPool1d, DynOPool3d, count_gmacs
from dynoswap.cost.handles import macs_per_output


def test_macs_per_output_is_two_to_the_d_points_of_two_to_the_d_weights():
    assert [macs_per_output(d) for d in (1, 2, 3)] == [4, 16, 64]


def test_1d_model_count_is_exact():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), DynOPool1d(0.5), nn.Conv1d(4, 5, 3, padding=1))
    count = count_gmacs(model, (32,))
    # conv: outputs x (in_channels x kernel); DynOPool1d: 16 cells x 4 channels x 4
    expected = {"0": 4 * 32 * 2 * 3, "1": 4 * 16 * 4, "2": 5 * 16 * 4 * 3}
    assert count.by_layer == pytest.approx({k: v / 1e9 for k, v in expected.items()}, rel=1e-12)
    assert count.total == pytest.approx(sum(expected.values()) / 1e9, rel=1e-12)
    assert count.dynopool == pytest.approx(256 / 1e9, rel=1e-12) and count.input_size == (32,)


@pytest.mark.parametrize(("scale", "cells"), [(0.5, (2, 4, 3)), ((0.6, 0.4, 1.3), (2, 3, 8))])
def test_3d_model_count_follows_the_scale(scale, cells):
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), DynOPool3d(scale), nn.Conv3d(4, 3, 1))
    count = count_gmacs(model, (4, 8, 6), batch=2)
    volume = cells[0] * cells[1] * cells[2]
    expected = {"0": 2 * 4 * (4 * 8 * 6) * 2 * 27, "1": 2 * 4 * volume * 64, "2": 2 * 3 * volume * 4}
    assert count.by_layer == pytest.approx({k: v / 1e9 for k, v in expected.items()}, rel=1e-12)
    assert count.total == pytest.approx(sum(expected.values()) / 1e9, rel=1e-12)


def test_an_input_size_of_four_sides_is_refused():
    with pytest.raises(ValueError, match=r"input_size must be a positive int, an \(H, W\) pair, or \(L,\)"):
        count_gmacs(nn.Conv3d(1, 1, 1), (2, 2, 2, 2))
    with pytest.raises(ValueError, match="input_size must be"):
        count_gmacs(nn.Conv1d(1, 1, 1), (0,))
    with pytest.raises(ValueError, match=r"input_size \(8, 8, 8\) has 3 side\(s\), but the model has no Conv3d"):
        count_gmacs(nn.Conv2d(1, 1, 1), (8, 8, 8))


def test_channels_come_from_the_first_conv_of_the_input_dimension():
    model = nn.Sequential(nn.Conv1d(7, 2, 1), nn.Flatten(), nn.Linear(2 * 9, 1))
    assert count_gmacs(model, (9,)).total == pytest.approx((2 * 9 * 7 + 18) / 1e9, rel=1e-12)
