"""DATA specs for ``dynoswap train``: ``kind`` or ``kind:PATH``, one handler per kind.

Built-in synthetic sets (``barcodes``, ``barcodes-noisy``, ``digits-stretch``, ``digits-tile``,
``digits-large``; the 1-D ``pulses`` and the video ``moving-bars``) need no files.
``imagefolder:PATH`` and ``cifar10:PATH`` / ``cifar100:PATH`` read local files only: nothing is
ever downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DataError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset

# torch and the data sets are imported by the handlers: check_data_spec runs before any slow import.


@dataclass
class DataBundle:
    """Train and validation sets with what a model needs to know about them."""

    name: str
    train: Dataset
    val: Dataset | None
    num_classes: int
    input_size: tuple[int, ...]  #: (H, W) of the images, (L,) of 1-D signals, (T, H, W) of clips


Handler = Callable[[str, "tuple[int, ...] | None", int], DataBundle]

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _barcodes_with(name: str, noisy: bool) -> Handler:
    def handler(path: str, input_size: tuple[int, ...] | None, seed: int) -> DataBundle:
        from . import datasets

        # Drawn at the input size (bars one pixel wide, the full height): nothing is resized.
        h, w = input_size or (32, 32)
        noise = datasets.NOISY_BARCODES if noisy else 0.5
        train = datasets.barcodes(True, size=w, height=h, seed=seed, noise=noise)
        val = datasets.barcodes(False, size=w, height=h, seed=seed, noise=noise)
        return DataBundle(name, train, val, 10, (h, w))

    return handler


def _digits(variant: str) -> Handler:
    def handler(path: str, input_size: tuple[int, ...] | None, seed: int) -> DataBundle:
        from . import datasets

        # Another input size resizes each sample (after its crop) from the variant's own size.
        size = tuple(input_size) if input_size else None
        train = datasets.digits(variant, True, seed=seed, resize=size)  # type: ignore[arg-type]
        val = datasets.digits(variant, False, seed=seed, resize=size)  # type: ignore[arg-type]
        return DataBundle(f"digits-{variant}", train, val, 10, tuple(train[0][0].shape[-2:]))

    return handler


def _need_path(kind: str, path: str) -> Path:
    if not path:
        raise DataError(f"{kind} needs a folder: write {kind}:PATH")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"{kind}: folder {root} does not exist")
    return root


def _imagefolder(path: str, input_size: tuple[int, ...] | None, seed: int) -> DataBundle:
    from torchvision import datasets as tv_datasets
    from torchvision import transforms as T

    root = _need_path("imagefolder", path)
    size = tuple(input_size or (224, 224))
    if not (root / "train").is_dir():
        raise DataError(f"imagefolder: expected {root}/train/<class>/*.jpg (and optionally {root}/val/<class>/...)")
    normalise = T.Normalize(_IMAGENET_MEAN, _IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), normalise])
    resize = tuple(int(round(s / 0.875)) for s in size)
    val_tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), normalise])
    train = tv_datasets.ImageFolder(str(root / "train"), transform=train_tf)
    val = tv_datasets.ImageFolder(str(root / "val"), transform=val_tf) if (root / "val").is_dir() else None
    return DataBundle(f"imagefolder:{root}", train, val, len(train.classes), size)


def _cifar(kind: str) -> Handler:
    def handler(path: str, input_size: tuple[int, ...] | None, seed: int) -> DataBundle:
        from torchvision import datasets as tv_datasets
        from torchvision import transforms as T

        root = _need_path(kind, path)
        cls = tv_datasets.CIFAR10 if kind == "cifar10" else tv_datasets.CIFAR100
        folder = "cifar-10-batches-py" if kind == "cifar10" else "cifar-100-python"
        size = tuple(input_size or (32, 32))
        mean, std = _CIFAR_STATS[kind]
        resize = [] if size == (32, 32) else [T.Resize(size)]
        train_tf = T.Compose([*resize, T.RandomCrop(size, padding=4), T.RandomHorizontalFlip(), T.ToTensor()])
        train_tf.transforms.append(T.Normalize(mean, std))
        val_tf = T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])
        try:
            train = cls(str(root), train=True, transform=train_tf, download=False)
            val = cls(str(root), train=False, transform=val_tf, download=False)
        except RuntimeError as err:
            raise DataError(
                f"{kind}: no data set found under {root}; extract the python version of {kind.upper()} "
                f"(e.g. {folder}.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html) so that "
                f"{root}/{folder}/ exists. dynoswap never downloads data."
            ) from err
        return DataBundle(f"{kind}:{root}", train, val, len(train.classes), size)

    return handler


def _pulses(path: str, input_size: tuple[int, ...] | None, seed: int) -> DataBundle:
    from . import datasets

    # Drawn at the default length; another input size resamples the same waveforms (antialiased).
    size = (int(input_size[0]),) if input_size else (datasets.PULSES_LENGTH,)
    train = datasets.pulses(True, seed=seed, resize=size)
    val = datasets.pulses(False, seed=seed, resize=size)
    return DataBundle("pulses", train, val, 10, size)


def _moving_bars(path: str, input_size: tuple[int, ...] | None, seed: int) -> DataBundle:
    from . import datasets

    # Drawn at (16, 32, 32); another input size resizes each clip (antialiased, per axis).
    size = tuple(int(v) for v in input_size) if input_size else datasets.MOVING_BARS_SIZE
    train = datasets.moving_bars(True, seed=seed, resize=size)  # type: ignore[arg-type]
    val = datasets.moving_bars(False, seed=seed, resize=size)  # type: ignore[arg-type]
    return DataBundle("moving-bars", train, val, 10, size)


#: kind -> handler(path, input_size, seed)
DATA_HANDLERS: dict[str, Handler] = {
    "barcodes": _barcodes_with("barcodes", noisy=False),
    "barcodes-noisy": _barcodes_with("barcodes-noisy", noisy=True),
    "digits-stretch": _digits("stretch"),
    "digits-tile": _digits("tile"),
    "digits-large": _digits("large"),
    "imagefolder": _imagefolder,
    "cifar10": _cifar("cifar10"),
    "cifar100": _cifar("cifar100"),
    "pulses": _pulses,
    "moving-bars": _moving_bars,
}

#: kind -> how many numbers its input size has: 2 for images (H, W), 1 for signals (L,), 3 for clips (T, H, W).
INPUT_DIMS: dict[str, int] = {kind: 2 for kind in DATA_HANDLERS} | {"pulses": 1, "moving-bars": 3}

_AXES = {1: "L", 2: "H W", 3: "T H W"}


#: Kinds that read local files: ``kind:PATH`` names their folder.
PATH_KINDS = ("imagefolder", "cifar10", "cifar100")


def check_data_spec(spec: str) -> tuple[str, str]:
    """Check a DATA spec without importing torch: a known kind, and an existing folder where one is needed.

    Returns:
        The kind (lower case) and the path part.

    Raises:
        DataError: Unknown kind, a missing ``:PATH`` or a folder that does not exist.
    """
    kind, _, path = spec.partition(":")
    kind = kind.lower()
    if kind not in DATA_HANDLERS:
        raise DataError(f"unknown data {spec!r}; choose one of {', '.join(DATA_HANDLERS)} (kind or kind:PATH)")
    if kind in PATH_KINDS:
        _need_path(kind, path)
    elif path:
        raise DataError(f"{kind} is built in and reads no files; write {kind} without :{path}")
    return kind, path


def check_input_size(kind: str, input_size: tuple[int, ...] | None) -> None:
    """Refuse, without importing torch, an input size whose length does not fit the data kind.

    Raises:
        DataError: e.g. two numbers for ``pulses`` (it takes one, L), one for ``barcodes``, or a size < 1.
    """
    if input_size is None:
        return
    dims = INPUT_DIMS[kind]
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_size):
        raise DataError(f"an input size must be whole numbers >= 1, got {input_size!r}")
    if len(input_size) != dims:
        given = " ".join(str(v) for v in input_size)
        raise DataError(f"{kind} takes an input size of {dims} number{'s' * (dims > 1)} ({_AXES[dims]}), got {given}")


def load_data(spec: str, input_size: tuple[int, ...] | None = None, seed: int = 0) -> DataBundle:
    """Build the train/val sets named by ``spec`` (``kind`` or ``kind:PATH``).

    Args:
        spec: e.g. ``barcodes``, ``pulses``, ``imagefolder:/data/birds``, ``cifar100:~/data``.
        input_size: (H, W) of the images (barcodes are drawn at it, the other kinds resized to it),
            (L,) for ``pulses``, (T, H, W) for ``moving-bars`` (both resized to it); ``None`` keeps
            each kind's own size.
        seed: Seed of the synthetic sets and of the digits split.

    Raises:
        DataError: Unknown kind, missing folder or files, or an input size of the wrong length.
    """
    kind, path = check_data_spec(spec)
    size = tuple(input_size) if input_size else None
    check_input_size(kind, size)
    return DATA_HANDLERS[kind](path, size, seed)


def make_loaders(
    bundle: DataBundle,
    batch_size: int,
    *,
    workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    pin_memory: bool = False,
) -> tuple[DataLoader, DataLoader | None]:
    """Train and validation loaders; under DDP each rank reads its own shard (DistributedSampler).

    The training loader drops the last incomplete batch (BatchNorm needs more than one
    sample) unless the set is smaller than one batch.
    """
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    common: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory, "persistent_workers": False}
    drop_last = len(bundle.train) > batch_size * world_size  # type: ignore[arg-type]
    if world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler: Any = DistributedSampler(bundle.train, world_size, rank, shuffle=True, seed=seed, drop_last=drop_last)
        train = DataLoader(bundle.train, batch_size, sampler=sampler, drop_last=drop_last, **common)
        val_sampler: Any = (
            DistributedSampler(bundle.val, world_size, rank, shuffle=False) if bundle.val is not None else None
        )
    else:
        train = DataLoader(bundle.train, batch_size, shuffle=True, drop_last=drop_last, **common)
        val_sampler = None
    val = (
        DataLoader(bundle.val, batch_size, shuffle=False, sampler=val_sampler, **common)
        if bundle.val is not None
        else None
    )
    return train, val
