"""Built-in data sets whose information is unevenly spread over space or time (paper section 3, Figure 1).

``barcodes`` carries its class only along the horizontal axis, so vertical
resolution is worthless. The ``digits-*`` sets are the paper's CIFAR-stretch,
CIFAR-tile and CIFAR-large constructions applied to scikit-learn's bundled 8x8
handwritten digits (upscaled to 32x32), so they need no download.

``pulses`` (1-D, (1, 4096)): a class is a cyclic 6-bit code of 64-sample segments, each "on"
segment a tapered burst of a fast carrier (0.2-0.3 cycles per sample), under a slow wander and
white noise (:func:`make_pulses`).

- Can show: the class needs the input's full rate at the first layer, and little rate after it.
  A detector of the carrier's energy at the full rate, pooled to 2 samples per segment (1/32 of
  the rate), reads the class (an oracle: 99%); pooled to 1 per segment, 84%. Shrinking the input
  first loses it: an antialiased linear resize by 2 keeps about an eighth of the carrier's power
  (aliased), by 4 less than 0.1%. So a fixed design on a shrunk input falls towards chance, while
  a network that keeps the input rate and pools hard after its first layer need not.
- Cannot show: which rate each later stage needs beyond about two samples per segment (any rate
  above that reads the code), or anything about real audio, whose information is spread over many
  bands and time scales.

``moving-bars`` (video, (3, 16, 32, 32)): a class is a cyclic 6-bit code of 4-pixel bands
across H (or, at random per clip, across W); each "on" band holds a one-pixel grating along the
other axis (the Nyquist rate, fixed to the pixel grid, zero mean); the bands drift by at most a
quarter pixel per frame; random colour and per-pixel noise (:func:`moving_bars_clip`).

- Can show: time and space need different rates. Every frame carries the whole class (an
  oracle reads it from one frame, from the mean of all frames, or after a 4x antialiased shrink
  in time, at 100%), while a 2x antialiased shrink in space cancels the grating in every interior
  pixel, so the class survives only in the residue of the border rows and columns.
- Cannot show: a trade-off inside the time axis (frames are fully redundant: nothing is gained by
  keeping any particular number of them), motion as a cue (the drift carries no class), or
  anything about natural video.

Every set is generated from a seed and yields ``(sample, label)``, roughly zero mean and unit
variance: images (3, H, W) and signals (1, L) held in memory, clips (3, T, H, W) each drawn from
its own seed when read (1024 clips held in memory would take 200 MB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import MissingExtraError


class TensorImages(Dataset):
    """In-memory images and labels, with an optional random vertical crop per sample.

    Args:
        images: Tensor (N, 3, H, W).
        labels: Tensor (N,) of int64.
        crop_height: When set, each sample is cut to this height at a random row
            (``train=True``) or at the centre (``train=False``).
        train: Whether crops are random.
        resize: When set, each sample (after its crop) is resized bilinearly to this (H, W),
            with antialiasing when it shrinks.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        crop_height: int | None = None,
        train: bool = True,
        resize: tuple[int, int] | None = None,
    ) -> None:
        self.images = images
        self.labels = labels
        self.crop_height = crop_height
        self.train = train
        self.resize = resize
        self.classes = [str(c) for c in range(int(labels.max()) + 1)] if labels.numel() else []

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.crop_height is not None:
            spare = image.shape[-2] - self.crop_height
            # Torch's global generator (seeded per worker by the DataLoader) keeps resumes exact.
            top = int(torch.randint(0, spare + 1, ())) if self.train else spare // 2
            image = image[:, top : top + self.crop_height]
        if self.resize is not None and tuple(image.shape[-2:]) != self.resize:
            image = F.interpolate(image[None], size=self.resize, mode="bilinear", align_corners=False, antialias=True)[
                0
            ]
        return image, int(self.labels[index])


def _standardise(images: torch.Tensor) -> torch.Tensor:
    return (images - images.mean()) / images.std().clamp_min(1e-6)


# -- barcodes ---------------------------------------------------------------
def barcode_codes(num_classes: int, bars: int = 6) -> torch.Tensor:
    """Distinct bit patterns that stay distinct under cyclic shifts, shape (num_classes, bars).

    The patterns are the binary necklaces of length ``bars`` (smallest rotation of
    each class), without the two constant ones, in increasing order.
    """
    necklaces: list[tuple[int, ...]] = []
    for value in range(1, 2**bars - 1):
        bits = tuple((value >> (bars - 1 - i)) & 1 for i in range(bars))
        if bits == min(bits[k:] + bits[:k] for k in range(bars)):
            necklaces.append(bits)
    if num_classes > len(necklaces):
        raise ValueError(f"{bars} bars give {len(necklaces)} shift-distinct codes, asked for {num_classes}")
    return torch.tensor(necklaces[:num_classes], dtype=torch.float32)


def make_barcodes(
    n: int,
    *,
    size: int = 32,
    height: int | None = None,
    num_classes: int = 10,
    bars: int = 6,
    noise: float = 0.5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of one-pixel vertical bars whose repeating pattern encodes the class.

    A class is a cyclic code of ``bars`` bits, repeated across the width at a random
    phase, so any few columns identify it but only at full horizontal resolution:
    halving the width merges neighbouring bars. Every pixel column is constant up
    to noise, so vertical resolution carries no information.

    Args:
        n: Number of images.
        size: Image width (and height, unless ``height`` is given).
        height: Image height (default ``size``); the bars run the full height.
        num_classes: Number of classes (at most 12 with 6 bars).
        bars: Length of a class's code in pixels.
        noise: Standard deviation of the per-pixel Gaussian noise (bars are 0 or 1).
        seed: Seed of labels, phases, colours and noise.

    Returns:
        Images (n, 3, height, size) and labels (n,).
    """
    codes = barcode_codes(num_classes, bars)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=gen)
    phase = torch.randint(0, bars, (n, 1), generator=gen)
    index = (torch.arange(size)[None, :] + phase) % bars  # (n, size)
    columns = codes[labels].gather(1, index)
    # A random colour per image: the class must not be readable from the channels.
    colour = 0.5 + torch.rand(n, 3, 1, 1, generator=gen)
    rows = size if height is None else height
    images = columns[:, None, None, :].expand(n, 3, rows, size) * colour
    images = images + noise * torch.randn(n, 3, rows, size, generator=gen)
    return _standardise(images), labels


def barcodes(
    train: bool,
    *,
    size: int = 32,
    height: int | None = None,
    n_train: int = 2048,
    n_val: int = 512,
    seed: int = 0,
    noise: float = 0.5,
) -> TensorImages:
    """Build the ``barcodes`` set: 10 classes of repeating one-pixel bar codes with noise.

    Images are ``size`` wide and ``height`` (default ``size``) tall.
    """
    images, labels = make_barcodes(
        n_train if train else n_val, size=size, height=height, noise=noise, seed=seed * 2 + (0 if train else 1)
    )
    return TensorImages(images, labels, train=train)


#: Per-pixel noise of ``barcodes-noisy``: a single row no longer identifies the class, so a model must
#: pool many rows (vertical resolution is redundant, not worthless) while keeping every column.
NOISY_BARCODES = 2.0


# -- digits (CIFAR-stretch / tile / large on sklearn's digits) ----------------
def load_digit_images(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 bundled 8x8 digits, upscaled bilinearly to ``size``, as (N, 1, size, size)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # optional extra
        raise MissingExtraError(
            "the digits-* data sets need scikit-learn: pip install 'dynoswap[data]' (or pip install scikit-learn)"
        ) from err
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, torch.as_tensor(digits.target, dtype=torch.int64)


def _split(n: int, train: bool, val_fraction: float, seed: int) -> torch.Tensor:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return order[n_val:] if train else order[:n_val]


def _stretch(images: torch.Tensor) -> torch.Tensor:
    """CIFAR-stretch: twice as tall; the data set crops back to square at random rows."""
    h, w = images.shape[-2:]
    return F.interpolate(images, size=(2 * h, w), mode="bilinear", align_corners=False)


def _tile(images: torch.Tensor) -> torch.Tensor:
    """CIFAR-tile: halved, then tiled 4x4 (32 -> 16 -> 64)."""
    half = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
    return half.repeat(1, 1, 4, 4)


def _large(images: torch.Tensor) -> torch.Tensor:
    """CIFAR-large: halved, then enlarged 4x (32 -> 16 -> 64)."""
    h, w = images.shape[-2:]
    half = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(half, size=(2 * h, 2 * w), mode="bilinear", align_corners=False)


#: name -> (transform of the (N, 1, 32, 32) digits, whether samples are cropped to square)
DIGIT_VARIANTS = {
    "stretch": (_stretch, True),
    "tile": (_tile, False),
    "large": (_large, False),
}


def digits(
    variant: str, train: bool, *, val_fraction: float = 0.2, seed: int = 0, resize: tuple[int, int] | None = None
) -> TensorImages:
    """Build a ``digits-<variant>`` set (``stretch`` 32x32, ``tile`` and ``large`` 64x64), 10 classes.

    With ``resize`` every sample is resized to that (H, W) after its crop.
    """
    if variant not in DIGIT_VARIANTS:
        raise ValueError(f"unknown digits variant {variant!r}; choose one of {sorted(DIGIT_VARIANTS)}")
    transform, crop = DIGIT_VARIANTS[variant]
    images, labels = load_digit_images(32)
    keep = _split(images.shape[0], train, val_fraction, seed)
    # Standardised over the whole set so both splits share one normalisation.
    images = _standardise(transform(images))[keep].expand(-1, 3, -1, -1).contiguous()
    return TensorImages(images, labels[keep], crop_height=32 if crop else None, train=train, resize=resize)


# -- resizing signals and clips ---------------------------------------------------
def resize_linear(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Resize the trailing ``len(size)`` axes of ``x`` (..., *axes) linearly, antialiased when shrinking.

    One axis at a time with ``F.interpolate``'s bilinear antialiasing (its only antialiased linear
    mode), the other axis of each pass kept at its size: (bi/tri)linear resizing with a triangle
    filter as wide as the shrink factor, the same filter the 2-D sets use.

    Args:
        x: Tensor whose last ``len(size)`` dimensions are resized.
        size: The new sizes of those dimensions.
    """
    axes = len(size)
    lead = x.shape[: x.dim() - axes]
    out = x.reshape(1, -1, *x.shape[-axes:])
    for axis, n in enumerate(size):
        if out.shape[2 + axis] == n:
            continue
        moved = out.movedim(2 + axis, -1)
        shape = moved.shape
        flat = moved.reshape(1, -1, 1, shape[-1])
        flat = F.interpolate(flat, size=(1, n), mode="bilinear", align_corners=False, antialias=True)
        out = flat.reshape(*shape[:-1], n).movedim(-1, 2 + axis)
    return out.reshape(*lead, *size)


class TensorSamples(Dataset):
    """In-memory samples (N, C, *axes) and labels, yielded as ``(sample, label)``.

    Args:
        samples: Tensor (N, C, *axes).
        labels: Tensor (N,) of int64.
    """

    def __init__(self, samples: torch.Tensor, labels: torch.Tensor) -> None:
        self.samples = samples
        self.labels = labels
        self.classes = [str(c) for c in range(int(labels.max()) + 1)] if labels.numel() else []

    def __len__(self) -> int:
        return self.samples.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.samples[index], int(self.labels[index])


def balanced_labels(n: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels, each class ``n // num_classes`` or one more times, in a random order."""
    return (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]


# -- pulses (1-D) -----------------------------------------------------------------
#: Default length of a ``pulses`` signal: M5's total reduction is 1024, so the signal can be resized by 4.
PULSES_LENGTH = 4096


def make_pulses(
    n: int,
    *,
    length: int = PULSES_LENGTH,
    segment: int = 64,
    num_classes: int = 10,
    bars: int = 6,
    band: tuple[float, float] = (0.2, 0.3),
    amplitude: float = 1.5,
    wander: float = 1.0,
    noise: float = 1.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Signals whose class is a slow on/off code of fast carrier bursts (the ``pulses`` set).

    The time axis is cut into segments of ``segment`` samples; a class is a cyclic code of ``bars``
    bits (:func:`barcode_codes`) repeated over the segments from a random offset, and every "on"
    segment holds a burst of a carrier whose frequency is drawn per signal from ``band`` (cycles per
    sample), under a sin^2 taper so that the burst envelope is smooth. A slow wander (three sinusoids
    below one cycle per code period) and white noise are added.

    What the set can and cannot show is in this module's docstring.

    Args:
        n: Number of signals.
        length: Samples per signal.
        segment: Samples per code bit.
        num_classes: Number of classes (at most 12 with 6 bars).
        bars: Bits of a class's code.
        band: Range of the carrier frequency, in cycles per sample (0.5 is the Nyquist rate).
        amplitude: Carrier amplitude at the centre of a burst.
        wander: Scale of the slow wander (class-independent).
        noise: Standard deviation of the white noise.
        seed: Seed of labels, offsets, carriers, wander and noise.

    Returns:
        Signals (n, 1, length), standardised over the set, and labels (n,), balanced over the classes.
    """
    codes = barcode_codes(num_classes, bars)
    gen = torch.Generator().manual_seed(seed)
    labels = balanced_labels(n, num_classes, gen)
    t = torch.arange(length, dtype=torch.float32)[None]
    pos = t + torch.randint(0, bars * segment, (n, 1), generator=gen)  # a random offset into the code
    bits = codes[labels].gather(1, torch.div(pos, segment, rounding_mode="floor").long() % bars)
    taper = torch.sin(torch.pi * (pos % segment) / segment) ** 2
    low, high = band
    freq = low + (high - low) * torch.rand(n, 1, generator=gen)
    carrier = torch.cos(2 * torch.pi * freq * t + 2 * torch.pi * torch.rand(n, 1, generator=gen))
    slow = torch.rand(n, 3, 1, generator=gen) / (bars * segment)
    phase = 2 * torch.pi * torch.rand(n, 3, 1, generator=gen)
    drift = torch.cos(2 * torch.pi * slow * t[:, None] + phase).sum(1) * (2 / 3) ** 0.5  # unit variance
    signals = amplitude * bits * taper * carrier + wander * drift
    signals = signals + noise * torch.randn(n, length, generator=gen)
    return _standardise(signals[:, None]), labels


def pulses(
    train: bool,
    *,
    length: int = PULSES_LENGTH,
    n_train: int = 2048,
    n_val: int = 512,
    seed: int = 0,
    resize: tuple[int] | None = None,
) -> TensorSamples:
    """Build the ``pulses`` set: 10 classes of coded carrier bursts, (1, ``length``) signals.

    With ``resize`` every signal (drawn at ``length``) is resized to that (L,) with
    :func:`resize_linear`: the same waveform at another sampling rate.
    """
    signals, labels = make_pulses(n_train if train else n_val, length=length, seed=seed * 2 + (0 if train else 1))
    if resize is not None and tuple(resize) != (length,):
        signals = resize_linear(signals, tuple(resize))
    return TensorSamples(signals, labels)


# -- moving-bars (video) ------------------------------------------------------------
#: Default (T, H, W) of a ``moving-bars`` clip.
MOVING_BARS_SIZE = (16, 32, 32)


def moving_bars_clip(
    label: int,
    generator: torch.Generator,
    *,
    size: tuple[int, int, int] = MOVING_BARS_SIZE,
    cell: int = 4,
    bars: int = 6,
    speed: float = 0.25,
    noise: float = 1.0,
    num_classes: int = 10,
) -> torch.Tensor:
    """One raw (unstandardised) clip (3, T, H, W) of the ``moving-bars`` set; see :func:`moving_bars`.

    Args:
        label: The class.
        generator: Source of the clip's offset, speed, orientation, colour and noise.
        size: (T, H, W).
        cell: Pixels per code bit (the height of a band).
        bars: Bits of a class's code.
        speed: Largest drift of the bands, in pixels per frame.
        noise: Standard deviation of the per-pixel Gaussian noise.
        num_classes: Number of classes.
    """
    frames, h, w = size
    code = barcode_codes(num_classes, bars)[label]
    start = float(torch.rand((), generator=generator)) * bars * cell
    velocity = (2 * float(torch.rand((), generator=generator)) - 1) * speed
    bands_across_h = bool(torch.randint(0, 2, (), generator=generator))
    colour = 0.5 + torch.rand(3, 1, 1, 1, generator=generator)
    across, along = (h, w) if bands_across_h else (w, h)
    where = torch.arange(across)[None] + start + velocity * torch.arange(frames)[:, None]  # (T, across)
    bits = code[torch.div(where, cell, rounding_mode="floor").long() % bars]
    grating = 1.0 - 2.0 * (torch.arange(along) % 2)  # one-pixel stripes: the Nyquist rate, fixed to the grid
    clip = bits[:, :, None] * grating  # (T, across, along)
    if not bands_across_h:
        clip = clip.transpose(1, 2)
    return colour * clip + noise * torch.randn(3, frames, h, w, generator=generator)


class MovingBars(Dataset):
    """The ``moving-bars`` clips, each drawn from its own seed when read (nothing is held but the labels).

    Args:
        n: Number of clips.
        seed: Seed of the labels and of every clip (clip ``i`` uses ``seed * 2**32 + i``).
        size: (T, H, W) the clips are drawn at.
        noise: Standard deviation of the per-pixel noise.
        resize: When set, each clip is resized to this (T, H, W) with :func:`resize_linear`.
        num_classes: Number of classes.
    """

    def __init__(
        self,
        n: int,
        *,
        seed: int = 0,
        size: tuple[int, int, int] = MOVING_BARS_SIZE,
        noise: float = 1.0,
        resize: tuple[int, int, int] | None = None,
        num_classes: int = 10,
    ) -> None:
        self.seed = seed
        self.size = size
        self.noise = noise
        self.resize = None if resize is None or tuple(resize) == tuple(size) else tuple(resize)
        self.num_classes = num_classes
        self.labels = balanced_labels(n, num_classes, torch.Generator().manual_seed(seed))
        self.classes = [str(c) for c in range(num_classes)]
        # Standardised with the set's expected moments: the grating has zero mean, and a pixel's variance
        # is E[colour^2] * P(bit on) + noise^2, with colour ~ U(0.5, 1.5) and the classes balanced.
        on = float(barcode_codes(num_classes).mean())
        self.std = ((13 / 12) * on + noise**2) ** 0.5

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"clip {index} of {len(self)}")
        gen = torch.Generator().manual_seed(self.seed * 2**32 + index)
        label = int(self.labels[index])
        clip = moving_bars_clip(label, gen, size=self.size, noise=self.noise, num_classes=self.num_classes)
        clip = clip / self.std
        return (resize_linear(clip, self.resize) if self.resize else clip), label


def moving_bars(
    train: bool,
    *,
    size: tuple[int, int, int] = MOVING_BARS_SIZE,
    n_train: int = 1024,
    n_val: int = 256,
    seed: int = 0,
    resize: tuple[int, int, int] | None = None,
) -> MovingBars:
    """Build the ``moving-bars`` set: 10 classes of clips (3, T, H, W), drawn at ``size``, optionally resized."""
    return MovingBars(n_train if train else n_val, seed=seed * 2 + (0 if train else 1), size=size, resize=resize)
