"""Presets: the supplement's Tables 1-2 as shipped YAML, lookup order and validation."""

from __future__ import annotations

import pytest

from dynoswap.presets import PresetError, available_presets, load_preset, load_preset_file, parse_preset

BACKBONES = ("vgg16", "resnet50", "mobilenet_v2")
DATASETS = ("aircraft", "cifar100", "imagenet")

# Supplement Table 2, columns in the order of BACKBONES within each dataset: (lambda, first-layer init scale).
TABLE2 = {
    "s": {
        "aircraft": [(3.07e-5, 0.5), (3.99e-5, 0.5), (3.00e-5, 0.5)],
        "cifar100": [(2.20e-4, 0.5), (0.0, 0.6), (5.00e-5, 0.5)],
        "imagenet": [(1.00e-4, 0.5), (8.00e-5, 0.5), (4.00e-5, 0.5)],
    },
    "b": {
        "aircraft": [(6.51e-6, 0.5), (0.0, 0.7), (0.0, 0.5)],
        "cifar100": [(1.59e-5, 0.5), (0.0, 0.8), (1.00e-7, 0.5)],
        "imagenet": [(7.00e-5, 0.5), (2.00e-5, 0.5), (1.00e-5, 0.5)],
    },
}
# Supplement Table 1: (lr, alpha lr, batch size per GPU, GPUs, epochs) per dataset and backbone.
TABLE1 = {
    "aircraft": [(1e-2, 1e-2, 8, 1, 250)] * 3,
    "cifar100": [(1e-1, 1e-2, 128, 1, 250)] * 3,
    "imagenet": [(1e-1, 5e-3, 64, 4, 120), (1e-1, 5e-3, 64, 4, 120), (5e-2, 5e-3, 64, 4, 120)],
}
WEIGHT_DECAY = {"vgg16": 5e-4, "resnet50": 5e-4, "mobilenet_v2": 4e-5}
INPUT = {"aircraft": (224, 224), "cifar100": (32, 32), "imagenet": (224, 224)}


def test_all_eighteen_presets_ship():
    names = set(available_presets())
    expected = {f"{b}-{d}-{v}" for b in BACKBONES for d in DATASETS for v in "sb"}
    assert expected <= names


@pytest.mark.parametrize("variant", ["s", "b"])
@pytest.mark.parametrize("dataset", DATASETS)
def test_presets_match_supplement_tables(dataset, variant):
    for i, backbone in enumerate(BACKBONES):
        preset = load_preset(f"{backbone}-{dataset}-{variant}")
        lam, first = TABLE2[variant][dataset][i]
        lr, alpha_lr, batch, gpus, epochs = TABLE1[dataset][i]
        paper_net = f"paper:{backbone}-cifar" if dataset == "cifar100" else f"paper:{backbone}"
        assert (preset.backbone, preset.dataset, preset.variant) == (paper_net, dataset, variant)
        assert preset.train.gmacs_lambda == pytest.approx(lam, rel=0, abs=1e-12)
        # 0.5 is the human design (the rule's own 1/stride): kept as None, only departures are set.
        assert preset.convert.first_init_scale == (None if first == 0.5 else first)
        assert preset.convert.init_scale is None
        assert preset.convert.placement == "post"
        assert preset.convert.input_size == INPUT[dataset]
        t = preset.train
        assert (t.lr, t.alpha_lr, t.batch_size, t.gpus, t.epochs) == (lr, alpha_lr, batch, gpus, epochs)
        assert (t.optimizer, t.momentum, t.scheduler) == ("sgd", 0.9, "cosine")
        assert t.weight_decay == WEIGHT_DECAY[backbone]
        assert t.amp is (dataset == "imagenet")


def test_env_dir_wins_over_builtin(tmp_path, monkeypatch):
    (tmp_path / "resnet50-imagenet-s.yaml").write_text("train:\n  epochs: 3\n")
    (tmp_path / "mine.yml").write_text("convert:\n  input_size: 96\n")
    monkeypatch.setenv("DYNOSWAP_CONFIGS", str(tmp_path))
    assert load_preset("resnet50-imagenet-s").train.epochs == 3
    assert load_preset("mine").convert.input_size == (96, 96)


def test_user_file_by_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("convert:\n  input_size: [100, 80]\n  placement: pre\ntrain:\n  lr: 0.5\n")
    preset = load_preset(str(path))
    assert preset.name == "c" and preset.path == path
    assert preset.convert.input_size == (100, 80) and preset.convert.placement == "pre"
    assert preset.train.lr == 0.5 and preset.train.epochs == 250  # defaults fill the rest


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("convert:\n  placment: post\n", "unknown key.*placment"),
        ("train:\n  lr: fast\n", "'lr' must be a number"),
        ("train:\n  epochs: 2.5\n", "'epochs' must be an integer"),
        ("convert:\n  placement: middle\n", "'placement' must be one of post, pre"),
        ("convert:\n  init_scale: -1\n", "'init_scale' must be > 0"),
        ("convert:\n  input_size: [1, 2, 3]\n", r"'input_size' must be \[H, W\]"),
        ("training:\n  lr: 1\n", "unknown key.*training"),
        ("- a\n- b\n", "must be a mapping"),
        ("train: [1]\n", "'train' must be a mapping"),
        ("train:\n  amp: yes please\n", "'amp' must be true or false"),
        ("convert: {a: [\n", "not valid YAML"),
    ],
)
def test_invalid_presets_say_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(PresetError, match=message):
        load_preset_file(path)


def test_unknown_preset_name_suggests():
    with pytest.raises(PresetError, match="did you mean resnet50-imagenet-s"):
        load_preset("resnet50-imagenet-z")
    with pytest.raises(PresetError, match="does not exist"):
        load_preset("missing/file.yaml")


def test_to_dict_round_trips_through_parse():
    preset = load_preset("vgg16-cifar100-b")
    data = preset.to_dict()
    again = parse_preset({k: data[k] for k in ("name", "backbone", "dataset", "variant", "convert", "train")})
    assert again.convert == preset.convert and again.train == preset.train
