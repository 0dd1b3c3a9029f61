"""The 1-D ``pulses`` and video ``moving-bars`` sets: determinism, shapes, balance, sizes, and where the class lives.

The structure tests decode the class with small oracles written here from the sets' descriptions (not
from the generators), so they check the docstrings' claims: the class of ``pulses`` is in the carrier's
energy at about two samples per code segment and gone after a 4x shrink of the input; the class of
``moving-bars`` is in every frame at the full spatial rate and gone from every interior pixel after a
2x spatial shrink.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dynoswap import zoo
from dynoswap.cli.common import exit_code_of
from dynoswap.train import DATA_HANDLERS, DataError, load_data, make_loaders
from dynoswap.train.data import INPUT_DIMS, check_data_spec, check_input_size
from dynoswap.train.datasets import (
    MovingBars,
    barcode_codes,
    make_pulses,
    moving_bars_clip,
    resize_linear,
)


# -- oracles -------------------------------------------------------------------------
def decode(profile: torch.Tensor, cell: int, bars: int = 6) -> torch.Tensor:
    """Class scores (n, 10) of profiles (n, [T,] L) holding ``cell`` samples per code bit.

    Each profile is matched to each class's cyclic code at every shift; scores add up over T.
    """
    if profile.dim() == 2:
        profile = profile[:, None]
    codes = barcode_codes(10, bars).double()
    length = profile.shape[-1]
    centred = profile.double() - profile.double().mean(-1, keepdim=True)
    best = None
    for shift in range(bars * cell):
        template = codes[:, ((torch.arange(length) + shift) // cell) % bars]
        template = template - template.mean(-1, keepdim=True)
        score = torch.einsum("ntl,cl->ntc", centred, template / template.norm(dim=-1, keepdim=True))
        best = score if best is None else torch.maximum(best, score)
    assert best is not None
    return best.sum(1)


def carrier_energy(signals: torch.Tensor, band: tuple[float, float] = (0.2, 0.3)) -> torch.Tensor:
    """Energy (n, L) of signals (n, L) in ``band`` (cycles per sample): an ideal band-pass, squared."""
    spectrum = torch.fft.rfft(signals.double(), dim=-1)
    freq = torch.fft.rfftfreq(signals.shape[-1], dtype=torch.float64)
    spectrum[..., (freq < band[0]) | (freq > band[1])] = 0
    return torch.fft.irfft(spectrum, n=signals.shape[-1], dim=-1) ** 2


def bars_oracle(clips: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """Predicted classes of clips (n, 3, T, H, W): one-pixel grating demodulated along W (bands across H) or H."""
    mean = clips.double().mean(1)
    _, _, h, w = mean.shape
    across_h = (mean * (1 - 2 * (torch.arange(w) % 2))).mean(3)
    across_w = (mean * (1 - 2 * (torch.arange(h) % 2))[:, None]).mean(2)
    return torch.maximum(decode(across_h, cell), decode(across_w, cell)).argmax(1)


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).double().mean())


# -- registry and sizes ----------------------------------------------------------------
def test_kinds_are_registered_with_their_dimensions():
    assert set(INPUT_DIMS) == set(DATA_HANDLERS)
    assert INPUT_DIMS["pulses"] == 1 and INPUT_DIMS["moving-bars"] == 3 and INPUT_DIMS["barcodes"] == 2
    assert check_data_spec("pulses") == ("pulses", "")
    assert check_data_spec("Moving-Bars") == ("moving-bars", "")
    with pytest.raises(DataError, match="built in and reads no files"):
        check_data_spec("pulses:/tmp")


@pytest.mark.parametrize(
    "kind, size, match",
    [
        ("pulses", (32, 32), "pulses takes an input size of 1 number \\(L\\), got 32 32"),
        ("moving-bars", (16, 32), "moving-bars takes an input size of 3 numbers \\(T H W\\), got 16 32"),
        ("barcodes", (32,), "barcodes takes an input size of 2 numbers \\(H W\\), got 32"),
        ("pulses", (0,), "whole numbers >= 1"),
    ],
)
def test_wrong_input_size_is_refused_before_building(kind, size, match):
    with pytest.raises(DataError, match=match) as info:
        check_input_size(kind, size)
    assert exit_code_of(info.value) == 2
    with pytest.raises(DataError, match=match):
        load_data(kind, size)


def test_pulses_shapes_balance_standardisation_and_determinism():
    a = load_data("pulses", seed=3)
    assert a.name == "pulses" and a.num_classes == 10 and a.input_size == (4096,)
    assert (len(a.train), len(a.val)) == (2048, 512)
    x, label = a.train[0]
    assert x.shape == (1, 4096) and x.dtype == torch.float32 and isinstance(label, int)
    assert torch.bincount(a.train.labels).tolist() == [205] * 8 + [204] * 2
    assert torch.bincount(a.val.labels, minlength=10).tolist() == [52] * 2 + [51] * 8
    assert a.train.samples.mean().abs() < 1e-5 and abs(float(a.train.samples.std()) - 1) < 1e-5
    b = load_data("pulses", seed=3)
    assert torch.equal(a.train.samples, b.train.samples) and torch.equal(a.val.labels, b.val.labels)
    other = load_data("pulses", seed=4)
    assert not torch.equal(a.train.samples[:512], other.train.samples[:512])
    assert not torch.equal(a.train.samples[:512], a.val.samples)  # the splits differ


def test_pulses_input_size_resamples_the_same_waveforms():
    full = load_data("pulses", seed=1)
    half = load_data("pulses", (2048,), seed=1)
    assert half.input_size == (2048,) and half.train[0][0].shape == (1, 2048)
    torch.testing.assert_close(half.val.samples, resize_linear(full.val.samples, (2048,)))
    assert torch.equal(half.val.labels, full.val.labels)
    assert load_data("pulses", (4096,), seed=1).train.samples.equal(full.train.samples)


def test_moving_bars_shapes_balance_standardisation_and_determinism():
    a = load_data("moving-bars", seed=2)
    assert a.name == "moving-bars" and a.num_classes == 10 and a.input_size == (16, 32, 32)
    assert (len(a.train), len(a.val)) == (1024, 256)
    clip, label = a.train[5]
    assert clip.shape == (3, 16, 32, 32) and clip.dtype == torch.float32 and label == int(a.train.labels[5])
    assert torch.equal(clip, a.train[5][0])  # each clip is drawn from its own seed, every time it is read
    assert torch.equal(clip, load_data("moving-bars", seed=2).train[5][0])
    assert not torch.equal(clip, load_data("moving-bars", seed=3).train[5][0])
    assert torch.bincount(a.train.labels).tolist() == [103] * 4 + [102] * 6
    clips = torch.stack([a.train[i][0] for i in range(128)])
    assert abs(float(clips.mean())) < 0.01 and abs(float(clips.std()) - 1) < 0.02
    with pytest.raises(IndexError):
        a.train[1024]


def test_moving_bars_input_size_resizes_each_clip():
    full = load_data("moving-bars", seed=0)
    small = load_data("moving-bars", (8, 24, 40), seed=0)
    assert small.input_size == (8, 24, 40) and small.val[3][0].shape == (3, 8, 24, 40)
    torch.testing.assert_close(small.val[3][0], resize_linear(full.val[3][0], (8, 24, 40)))


def test_resize_linear_is_the_2d_antialiased_resize_applied_per_axis():
    x = torch.randn(2, 3, 10, 20)
    torch.testing.assert_close(
        resize_linear(x, (7, 9)), F.interpolate(x, size=(7, 9), mode="bilinear", antialias=True, align_corners=False)
    )
    clip = torch.randn(3, 4, 6, 8)
    up = resize_linear(clip, (8, 12, 16))
    torch.testing.assert_close(up, F.interpolate(clip[None], size=(8, 12, 16), mode="trilinear")[0])
    assert torch.equal(resize_linear(clip, (4, 6, 8)), clip)
    # Shrinking time by 2 averages neighbouring frames with weights 1/8, 3/8, 3/8, 1/8 (inside the clip).
    frames = resize_linear(clip, (2, 6, 8))
    torch.testing.assert_close(frames[:, 0], (3 * clip[:, 0] + 3 * clip[:, 1] + clip[:, 2]) / 7)


# -- where the class lives -----------------------------------------------------------------------
def test_pulses_class_is_in_the_carrier_energy_at_two_samples_per_segment():
    signals, labels = make_pulses(400, seed=11)
    energy = carrier_energy(signals[:, 0])
    # A detector at the full rate, then average pooling to 2 samples per 64-sample segment.
    pooled = F.avg_pool1d(energy[:, None], 32)[:, 0]
    assert accuracy(decode(pooled, 2).argmax(1), labels) >= 0.97
    # Pooling before the detector (a linear shrink to the same rate, then energy) reads nothing.
    early = F.avg_pool1d(signals.double(), 32)[:, 0] ** 2
    assert accuracy(decode(early, 2).argmax(1), labels) < 0.2


def test_pulses_lose_the_carrier_when_the_input_shrinks_by_4():
    clean, _ = make_pulses(32, seed=2, noise=0.0, wander=0.0)
    power = clean.pow(2).mean()
    assert 0.08 < resize_linear(clean, (2048,)).pow(2).mean() / power < 0.2  # by 2: about an eighth is left
    assert resize_linear(clean, (1024,)).pow(2).mean() / power < 0.001  # by 4: gone


def test_moving_bars_class_is_in_every_frame_at_the_full_spatial_rate():
    bars = MovingBars(200, seed=9)
    clips = torch.stack([bars[i][0] for i in range(len(bars))])
    assert accuracy(bars_oracle(clips), bars.labels) >= 0.97
    assert accuracy(bars_oracle(clips[:, :, :1]), bars.labels) >= 0.97  # one frame is enough
    assert accuracy(bars_oracle(resize_linear(clips, (4, 32, 32))), bars.labels) >= 0.97  # frames averaged by 4
    assert accuracy(bars_oracle(clips.mean(2, keepdim=True)), bars.labels) >= 0.97  # the mean of all frames


def test_moving_bars_lose_the_class_inside_the_frame_when_space_shrinks_by_2():
    gen = torch.Generator().manual_seed(0)
    clean = torch.stack([moving_bars_clip(label % 10, gen, noise=0.0) for label in range(20)])
    assert clean.abs().amax() > 0.5
    small = resize_linear(clean, (16, 16, 16))
    assert small[..., 1:-1, 1:-1].abs().amax() < 1e-6  # the grating cancels in every interior pixel
    assert small.abs().amax() < 0.25  # only the border rows and columns keep a residue


# -- plain training learns them -------------------------------------------------------------
def _train(model: torch.nn.Module, loader, steps: int) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            done += 1
            if done == steps:
                break


def _accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    with torch.no_grad():
        hits = [(model(x).argmax(1) == y).double() for x, y in loader]
    return float(torch.cat(hits).mean())


def test_m5_learns_pulses_in_a_few_hundred_steps():
    torch.manual_seed(0)
    bundle = load_data("pulses", seed=0)
    train, val = make_loaders(bundle, 32, seed=0)
    model = zoo.build("m5", {"width": 0.125})
    _train(model, train, 200)
    assert _accuracy(model, val) > 0.6  # chance is 0.1


def test_video_tiny_learns_moving_bars_in_a_few_hundred_steps():
    torch.manual_seed(0)
    bundle = load_data("moving-bars", (8, 32, 32), seed=0)
    train, val = make_loaders(bundle, 32, seed=0)
    model = zoo.build("video-tiny", {"width": 0.5})
    _train(model, train, 80)
    assert _accuracy(model, val) > 0.5
