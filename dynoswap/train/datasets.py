"""Built-in data sets whose information is unevenly spread over space (paper section 3, Figure 1).

``barcodes`` carries its class only along the horizontal axis, so vertical
resolution is worthless. The ``digits-*`` sets are the paper's CIFAR-stretch,
CIFAR-tile and CIFAR-large constructions applied to scikit-learn's bundled 8x8
handwritten digits (upscaled to 32x32), so they need no download.

Every set is generated from a seed, is held in memory, and yields
``(image, label)`` with images of shape (3, H, W), roughly zero mean and unit
variance.
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
