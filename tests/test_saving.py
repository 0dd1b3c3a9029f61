"""save()/load(): JSON recipe + safetensors, replayed conversion, atomic writes, no pickles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dynoswap.engine import convert
from dynoswap.errors import CheckpointError, OutputExistsError, RecipeError
from dynoswap.io import SaveError, load, read_recipe, save
from dynoswap.layers import DynOPool2d
from dynoswap.models import ModelSource, build_model

SOURCE = ModelSource("torchvision", "resnet18", {"num_classes": 10})


def converted(**options):
    torch.manual_seed(0)
    model = build_model(SOURCE.library, SOURCE.name, SOURCE.kwargs)
    gm, _ = convert(model, (64, 64), source=SOURCE, **options)
    with torch.no_grad():
        for m in gm.modules():
            if isinstance(m, DynOPool2d) and m.leader is m:
                m.alpha.uniform_(1.3, 3.0)  # moved alphas must survive the round trip
    return gm


def test_round_trip_gives_identical_outputs(tmp_path: Path) -> None:
    gm = converted(overrides={"conv1": 0.3})
    out = save(gm, tmp_path / "model")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "recipe.json"]
    loaded = load(out)
    gm.eval(), loaded.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    assert list(loaded.state_dict()) == list(gm.state_dict())
    for key, value in gm.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    # Ties are rebuilt, not stored twice.
    follower = loaded.get_submodule("layer2.0.downsample.0_dynopool")
    assert follower.alpha is loaded.get_submodule("layer2.0.conv1_dynopool").alpha
    assert loaded.meta["dynoswap"] == gm.meta["dynoswap"]


def test_recipe_is_plain_json_and_weights_are_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    gm = converted()
    save(gm, tmp_path / "m")
    document = read_recipe(tmp_path / "m")
    assert document["recipe"]["source"] == SOURCE.to_dict()
    assert document["recipe"]["options"]["placement"] == "post"
    tensors = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert set(tensors) == set(gm.state_dict())
    assert "layer2.0.downsample.0_dynopool.alpha" not in tensors
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    assert not list((tmp_path / "m").glob("*.pt")) and not list((tmp_path / "m").glob("*.pkl"))


def test_shared_tensors_are_stored_once(tmp_path: Path) -> None:
    gm = converted()
    # Share one buffer under two keys, as weight tying does.
    gm.get_submodule("layer1.0.bn2").running_mean = gm.get_submodule("layer1.0.bn1").running_mean
    save(gm, tmp_path / "m")
    document = read_recipe(tmp_path / "m")
    assert document["aliases"] == {"layer1.0.bn2.running_mean": "layer1.0.bn1.running_mean"}
    loaded = load(tmp_path / "m")
    assert torch.equal(loaded.state_dict()["layer1.0.bn2.running_mean"], gm.state_dict()["layer1.0.bn1.running_mean"])


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    gm, _ = convert(build_model("torchvision", "resnet18", {"num_classes": 10}), (64, 64))
    with pytest.raises(SaveError, match="pass source= to convert"):
        save(gm, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_not_a_converted_model(tmp_path: Path) -> None:
    with pytest.raises(SaveError, match="dynoswap.convert"):
        save(torch.nn.Conv2d(1, 1, 1), tmp_path / "m")


def test_overwrite_is_atomic_and_limited_to_saved_models(tmp_path: Path) -> None:
    gm = converted()
    save(gm, tmp_path / "m")
    first = (tmp_path / "m" / "model.safetensors").read_bytes()
    with torch.no_grad():
        gm.get_submodule("conv1_dynopool").alpha.fill_(2.5)
    save(gm, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind
    with pytest.raises(OutputExistsError):
        save(gm, tmp_path / "m", overwrite=False)
    (tmp_path / "other").mkdir()
    with pytest.raises(OutputExistsError):
        save(gm, tmp_path / "other")


def test_load_rejects_foreign_directories(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no recipe.json"):
        load(tmp_path)
    (tmp_path / "recipe.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(RecipeError, match="not a dynoswap recipe"):
        load(tmp_path)


def test_leaf_classes_replay(tmp_path: Path) -> None:
    gm, _ = convert(
        build_model("torchvision", "resnet18", {"num_classes": 10}),
        (64, 64),
        source=SOURCE,
        leaf_modules=[torch.nn.BatchNorm2d],
    )
    save(gm, tmp_path / "m")
    assert read_recipe(tmp_path / "m")["recipe"]["options"]["leaf_modules"] == [
        "class:torch.nn.modules.batchnorm:BatchNorm2d"
    ]
    assert list(load(tmp_path / "m").state_dict()) == list(gm.state_dict())


def test_a_model_with_nan_weights_saves_verified_and_warns_on_load(tmp_path: Path) -> None:
    gm = converted()
    with torch.no_grad():
        gm.get_submodule("fc").bias[0] = float("nan")
    with pytest.warns(UserWarning, match=r"1 weight tensor\(s\) hold NaN or infinity \(fc.bias\)"):
        out = save(gm, tmp_path / "m")  # the read-back sees the same NaN: still identical
    with pytest.warns(UserWarning, match="NaN or infinity"):
        loaded = load(out)
    assert torch.isnan(loaded.state_dict()["fc.bias"][0])


def test_a_models_own_parameter_named_alpha_is_not_checked_as_a_scale(tmp_path):
    # timm's efficientvim has a layer scale called ``alpha`` of 1e-4: far below a DynOPool alpha's 1/8 limit.
    torch.manual_seed(0)

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.alpha = torch.nn.Parameter(torch.full((4,), 1e-4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    src = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10})
    gm, _ = convert(build_model("dynoswap", "vgg-tiny", {"num_classes": 10}), (32, 32), source=src)
    gm.add_submodule("layer_scale", Scaled())  # a parameter named alpha that no DynOPool owns
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    assert "layer_scale.alpha" in state
    from dynoswap.io.saving import _check_alphas

    _check_alphas(state, "m/model.safetensors", gm)  # not a DynOPool alpha: not refused
    state["3_dynopool.alpha"] = torch.tensor([1e-4, 2.0])
    with pytest.raises(CheckpointError, match="3_dynopool.alpha .*at least 0.125"):
        _check_alphas(state, "m/model.safetensors", gm)


USER_PACKAGE = """
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.down(self.pool(torch.relu(self.conv(x))))
        return self.head(x.mean((2, 3)))


def make():
    return Tiny()


def make_with(classes):
    return Tiny(classes)
"""


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A tiny importable package ``mymodels_<id>`` with a model class and factories; returns its module name."""
    name = f"mymodels_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "pkg" / name).mkdir(parents=True)
    (tmp_path / "pkg" / name / "__init__.py").write_text("")
    (tmp_path / "pkg" / name / "models.py").write_text(USER_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    return f"{name}.models"


def test_save_of_a_users_model_class_names_its_factory(tmp_path: Path, user_package: str) -> None:
    import importlib

    module = importlib.import_module(user_package)
    gm, _ = convert(module.Tiny(), (16, 16))  # no source: convert cannot know where the class lives
    with pytest.raises(SaveError, match=r"save\(model, path, source='mypkg.models:make'\)"):
        save(gm, tmp_path / "refused")
    with torch.no_grad():
        next(m for m in gm.modules() if isinstance(m, DynOPool2d)).alpha.fill_(2.5)
    out = save(gm, tmp_path / "mine", source=f"{user_package}:make")
    recipe = json.loads((out / "recipe.json").read_text())["recipe"]
    assert recipe["source"] == {"library": "user", "name": f"{user_package}:make", "kwargs": {}}
    loaded = load(out, trust_code=True)
    x = torch.randn(2, 3, 16, 16)
    gm.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    # The factory is recorded in the model, so a second save needs no source=.
    assert save(gm, tmp_path / "again") == tmp_path / "again"


def test_loading_a_users_factory_without_trust_code_is_refused_in_one_line(tmp_path: Path, user_package: str) -> None:
    import importlib

    from dynoswap.errors import UntrustedCodeError

    gm, _ = convert(importlib.import_module(user_package).Tiny(7), (16, 16))
    out = save(gm, tmp_path / "mine", source=ModelSource("user", f"{user_package}:make_with", {"classes": 7}))
    with pytest.raises(UntrustedCodeError) as info:
        load(out)
    message = str(info.value)
    assert "\n" not in message
    assert f"refused to import module {user_package!r} and call make_with(**{{'classes': 7}})" in message
    assert "trust_code=True" in message


def test_a_factory_that_does_not_rebuild_the_model_fails_the_save_and_records_nothing(
    tmp_path: Path, user_package: str
) -> None:
    import importlib

    gm, _ = convert(importlib.import_module(user_package).Tiny(7), (16, 16))
    with pytest.raises(SaveError, match="does not load back"):  # make() builds 3 classes, not 7
        save(gm, tmp_path / "mine", source=f"{user_package}:make")
    with pytest.raises(SaveError, match="does not load back: cannot import module 'nowhere.models'"):
        save(gm, tmp_path / "mine", source="nowhere.models:make")
    with pytest.raises(SaveError, match="must name a factory as 'package.module:function'"):
        save(gm, tmp_path / "mine", source="make")
    assert not (tmp_path / "mine").exists()
    with pytest.raises(SaveError, match="source is unknown"):  # nothing was recorded by the failed saves
        save(gm, tmp_path / "mine")
