"""The model resolver: library order, forced prefixes, user factories, suggestions, random weights only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynoswap.cli.common import exit_code_of
from dynoswap.errors import UntrustedCodeError
from dynoswap.models import ModelError, ModelSource, build_model, list_models, resolve, resolve_source, suggest


def tiny_factory(num_classes: int = 3, width: int = 4) -> nn.Module:
    """A user model for the ``pkg.module:factory`` form."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes)
    )


def not_a_module() -> int:
    return 3


def test_bare_name_prefers_torchvision_then_timm():
    assert resolve_source("resnet18") == ModelSource("torchvision", "resnet18", {})
    # resnet50d exists only in timm.
    assert resolve_source("resnet50d").library == "timm"


def test_prefix_forces_library():
    assert resolve_source("timm:resnet18").library == "timm"
    assert resolve_source("tv:resnet18").library == "torchvision"
    with pytest.raises(ModelError, match="not in torchvision"):
        resolve_source("tv:resnet50d")


def test_resolve_builds_with_num_classes_and_kwargs():
    model, source = resolve("timm:resnet18", num_classes=10, model_kwargs={"drop_rate": 0.25})
    assert source.to_dict() == {"library": "timm", "name": "resnet18", "kwargs": {"drop_rate": 0.25, "num_classes": 10}}
    assert model.fc.out_features == 10
    assert model.drop_rate == 0.25


def test_source_round_trip_rebuilds_same_architecture():
    model, source = resolve("resnet18", num_classes=7)
    again = ModelSource.from_dict(source.to_dict()).build()
    assert type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def _refuse(*args, **kwargs):
    raise AssertionError("tried to download weights")


@pytest.fixture
def no_downloads(monkeypatch):
    """Make every weight download path fail loudly (torchvision binds its own name for the hub loader)."""
    import timm.models._builder
    import torchvision.models._api

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", _refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", _refuse)
    monkeypatch.setattr(timm.models._builder, "load_state_dict_from_url", _refuse, raising=False)


def test_weights_are_random_not_downloaded(no_downloads):
    torch.manual_seed(0)
    a = build_model("torchvision", "resnet18", {"num_classes": 10})
    torch.manual_seed(1)
    b = build_model("torchvision", "resnet18", {"num_classes": 10})
    assert not torch.equal(a.conv1.weight, b.conv1.weight)
    build_model("timm", "resnet18", {"num_classes": 10})


def test_detection_builder_gets_no_pretrained_backbone(no_downloads):
    # ssdlite's builder defaults to an ImageNet backbone: building it must not try to fetch it.
    model = build_model("torchvision", "ssdlite320_mobilenet_v3_large", {"num_classes": 3})
    assert isinstance(model, nn.Module)


def test_user_factory():
    model, source = resolve("tests.test_models:tiny_factory", num_classes=5, model_kwargs={"width": 6}, trust_code=True)
    assert source == ModelSource("user", "tests.test_models:tiny_factory", {"width": 6, "num_classes": 5})
    assert model[-1].out_features == 5 and model[0].out_channels == 6


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:factory", "cannot import module"),
        ("tests.test_models:missing", "has no attribute"),
        ("tests.test_models:not_a_module", "not a torch.nn.Module"),
    ],
)
def test_user_factory_errors(spec, message):
    with pytest.raises(ModelError, match=message):
        resolve(spec, trust_code=True)


def test_user_factory_needs_trust_code_and_is_not_imported_without_it():
    import sys

    sys.modules.pop("tests.never_imported_factory", None)
    with pytest.raises(UntrustedCodeError, match=r"import module 'tests.never_imported_factory' and call make"):
        resolve("tests.never_imported_factory:make", num_classes=3)
    assert "tests.never_imported_factory" not in sys.modules


def test_unknown_name_suggests_close_names_from_both_libraries():
    with pytest.raises(ModelError) as info:
        resolve("resnet5o")
    message = str(info.value)
    assert "did you mean" in message and "tv:resnet50" in message and "timm:" in message
    assert exit_code_of(info.value) == 2
    assert suggest("mobilenetv2_100")[0] == "timm:mobilenetv2_100"


def test_bad_kwargs_are_a_model_error():
    with pytest.raises(UntrustedCodeError, match="no_such_argument is not an architecture argument"):
        build_model("torchvision", "resnet18", {"no_such_argument": 1})
    with pytest.raises(ModelError, match="cannot build torchvision:resnet18"):
        build_model("torchvision", "resnet18", {"no_such_argument": 1}, trust_code=True)
    with pytest.raises(ModelError, match="unknown model library"):
        build_model("keras", "resnet18", {})


def test_paths_that_are_not_saved_models(tmp_path):
    file = tmp_path / "weights.pth"
    file.write_bytes(b"x")
    with pytest.raises(ModelError, match="load checkpoints into a named model"):
        resolve(str(file))
    with pytest.raises(ModelError, match="not a saved dynoswap model"):
        resolve(str(tmp_path))


def test_a_directory_named_like_a_model_does_not_hide_the_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet18").mkdir()
    assert resolve("resnet18")[1].library == "torchvision"


def test_list_models_filters_by_pattern_and_source():
    rows = list_models("resnet1?", "tv")
    assert rows == [("torchvision", "resnet18")]
    both = list_models("resnet18")
    assert both == [("torchvision", "resnet18"), ("timm", "resnet18")]
    assert all(lib == "timm" for lib, _ in list_models("vgg*", "timm"))
    with pytest.raises(ModelError, match="unknown source"):
        list_models("x", "keras")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vgg-tiny", {"num_classes": -1}),
        ("vgg-tiny", {"widths": [8, -1]}),
        ("vgg-tiny", {"widths": []}),
        ("vgg-tiny", {"convs_per_stage": 0}),
        ("vgg-tiny", {"in_chans": True}),
        ("paper:resnet50-cifar", {"num_classes": 0}),
    ],
)
def test_zoo_counts_below_one_are_the_arguments_fault(name, kwargs):
    from dynoswap.errors import ModelError
    from dynoswap.sources import build_model

    with pytest.raises(ModelError, match="cannot build|must be"):
        build_model("dynoswap", name, kwargs)
