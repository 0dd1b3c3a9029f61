import sys

import pytest
import torch
import torch.nn.functional as F

from dynoswap.cli.common import exit_code_of
from dynoswap.train import DataError, load_data, make_loaders
from dynoswap.train.datasets import barcode_codes, digits, load_digit_images, make_barcodes


def test_barcode_codes_distinct_under_every_cyclic_shift():
    codes = barcode_codes(10, 6)
    assert codes.shape == (10, 6)
    rotations = [{tuple(torch.roll(c, k).tolist()) for k in range(6)} for c in codes]
    for i in range(10):
        for j in range(i + 1, 10):
            assert not rotations[i] & rotations[j]
    assert all(0 < c.sum() < 6 for c in codes)  # no constant code
    with pytest.raises(ValueError, match="shift-distinct"):
        barcode_codes(13, 6)


def test_barcodes_constant_columns_and_class_pattern():
    images, labels = make_barcodes(64, size=32, noise=0.0, seed=3)
    assert images.shape == (64, 3, 32, 32) and labels.shape == (64,)
    # Vertical resolution carries nothing: every row equals the first.
    assert torch.equal(images, images[:, :, :1, :].expand_as(images))
    codes = barcode_codes(10, 6)
    for image, label in zip(images, labels, strict=True):
        row = image[0, 0]
        bits = (row > row.mean()).long()
        # The row repeats the class code at some phase.
        assert any(torch.equal(bits, codes[label].long().roll(-k).repeat(6)[:32]) for k in range(6)), (
            f"row {bits.tolist()} is not class {int(label)}"
        )


def test_barcodes_same_seed_same_data_and_split_differs():
    a = load_data("barcodes", seed=1)
    b = load_data("barcodes", seed=1)
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images[:512], a.val.images)
    assert a.num_classes == 10 and a.input_size == (32, 32)
    assert load_data("barcodes", (48, 48)).train[0][0].shape == (3, 48, 48)


def test_digits_tile_is_a_4x4_tiling_of_the_halved_digit():
    images, _ = load_digit_images(32)
    assert images.shape == (1797, 1, 32, 32)
    tile = digits("tile", False)
    img = tile[0][0]
    assert img.shape == (3, 64, 64)
    block = img[:, :16, :16]
    for i in range(4):
        for j in range(4):
            assert torch.equal(img[:, 16 * i : 16 * i + 16, 16 * j : 16 * j + 16], block)


def test_digits_large_and_stretch_shapes_and_crops():
    large = digits("large", True)
    assert large[0][0].shape == (3, 64, 64)
    stretch_val = digits("stretch", False)
    x0, _ = stretch_val[0]
    x1, _ = stretch_val[0]
    assert x0.shape == (3, 32, 32) and torch.equal(x0, x1)  # validation: fixed centre crop
    # The centre crop of the stretched image: rows 16..48 of a 64x32 image.
    assert torch.equal(x0, stretch_val.images[0, :, 16:48])
    stretch_train = digits("stretch", True)
    torch.manual_seed(0)
    full = stretch_train.images[0]
    assert full.shape == (3, 64, 32)  # twice as tall
    offsets = []
    for _ in range(60):
        crop = stretch_train[0][0]
        offsets.append(next(t for t in range(33) if torch.equal(crop, full[:, t : t + 32])))
    assert len(set(offsets)) > 10  # random rows, every crop a window of the stretched image


def test_digits_split_is_disjoint_and_complete():
    train, val = digits("large", True), digits("large", False)
    assert len(train) + len(val) == 1797
    assert abs(len(val) - 359) <= 1
    both = torch.cat([train.images.flatten(1), val.images.flatten(1)])
    assert torch.unique(both, dim=0).shape[0] == both.shape[0] - _duplicates()


def _duplicates() -> int:
    images, _ = load_digit_images(32)
    flat = images.flatten(1)
    return flat.shape[0] - torch.unique(flat, dim=0).shape[0]


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"dynoswap\[data\]"):
        load_data("digits-tile")


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("mnist", "unknown data 'mnist'"),
        ("imagefolder", "needs a folder"),
        ("imagefolder:/nonexistent/x", "does not exist"),
        ("barcodes:/tmp", "barcodes is built in and reads no files"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(DataError, match=match) as info:
        load_data(spec)
    assert exit_code_of(info.value) == 2


def test_barcodes_are_drawn_at_any_input_size():
    bundle = load_data("barcodes", (20, 40))
    image, _ = bundle.val[0]
    assert bundle.input_size == (20, 40) and tuple(image.shape) == (3, 20, 40)
    # Without noise, a 20x40 image is the top half of the 40x40 one: the same bars, running the full height.
    short, labels = make_barcodes(4, size=40, height=20, noise=0.0, seed=3)
    square, same_labels = make_barcodes(4, size=40, noise=0.0, seed=3)
    assert torch.equal(labels, same_labels) and tuple(short.shape) == (4, 3, 20, 40)
    assert torch.allclose(short, square[:, :, :20], rtol=1e-3)  # standardised with n - 1: n differs
    assert torch.equal(short, short[:, :, :1].expand_as(short))


def test_digits_at_another_input_size_are_the_native_samples_resized():
    native = load_data("digits-stretch")
    resized = load_data("digits-stretch", (48, 40))
    assert native.input_size == (32, 32) and resized.input_size == (48, 40)
    image, label = resized.val[3]
    expected = F.interpolate(native.val[3][0][None], (48, 40), mode="bilinear", align_corners=False, antialias=True)[0]
    assert label == native.val[3][1] and torch.equal(image, expected)


def test_cifar_never_downloads_and_says_where_files_go(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python") as info:
        load_data(f"cifar100:{tmp_path}")
    assert "never downloads" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_imagefolder_reads_train_and_val(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 30), (10, 200, 30)).save(tmp_path / split / cls / "x.png")
    bundle = load_data(f"imagefolder:{tmp_path}", (24, 24))
    assert bundle.num_classes == 2 and bundle.input_size == (24, 24)
    assert bundle.train[0][0].shape == (3, 24, 24) and bundle.val[0][0].shape == (3, 24, 24)
    with pytest.raises(DataError, match="train"):
        load_data(f"imagefolder:{tmp_path / 'val'}")


def test_loaders_shard_between_ranks():
    bundle = load_data("barcodes")
    shards = []
    for rank in range(2):
        train, val = make_loaders(bundle, 64, rank=rank, world_size=2, seed=0)
        train.sampler.set_epoch(0)
        shards.append(set(train.sampler))
        assert len(train) == 16 and len(val.sampler) == 256
    assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == 2048
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        make_loaders(bundle, 0)


def test_barcodes_noisy_keeps_the_bars_under_four_times_the_noise():
    clean, noisy = load_data("barcodes", seed=2), load_data("barcodes-noisy", seed=2)
    assert noisy.name == "barcodes-noisy" and noisy.input_size == (32, 32) and noisy.num_classes == 10
    assert torch.equal(clean.train.labels, noisy.train.labels)  # same codes, phases and colours

    def noise_to_signal(images: torch.Tensor) -> float:
        columns = images.mean(dim=-2, keepdim=True)  # the bars: constant down each column
        return float((images - columns).std() / columns.std())

    ratio = noise_to_signal(noisy.train.images) / noise_to_signal(clean.train.images)
    assert 3.0 < ratio < 5.0, ratio
    # Averaging the rows still recovers the code: the columns of one image correlate with the clean ones.
    a, b = clean.train.images[:64].mean(dim=(1, 2)), noisy.train.images[:64].mean(dim=(1, 2))
    corr = torch.nn.functional.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)).mean()
    assert float(corr) > 0.8
