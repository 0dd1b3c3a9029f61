"""Loading never runs code the user did not ask for: each attack leaves a marker file that must not appear.

Every crafted folder starts as a real saved model (vgg-tiny from the zoo, 32x32) whose
recipe is then edited the way an attacker would. The positive control at the end shows
that the same markers do appear when the code is trusted, so the tests can fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.errors import PresetError, UntrustedCodeError
from dynoswap.io.recipe import RECIPE_FILE
from dynoswap.models import ModelSource, build_model, resolve
from dynoswap.presets import parse_preset

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
ZOO = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10})
runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A genuine saved model to copy and tamper with."""
    torch.manual_seed(0)
    gm, _ = dynoswap.convert(ZOO.build(), (32, 32), source=ZOO)
    return dynoswap.save(gm, tmp_path_factory.mktemp("genuine") / "model")


def tampered(saved: Path, dest: Path, edit) -> Path:
    """Copy ``saved`` to ``dest`` and apply ``edit(document)`` to its recipe."""
    dest.mkdir(parents=True)
    for name in ("recipe.json", "model.safetensors"):
        (dest / name).write_bytes((saved / name).read_bytes())
    document = json.loads((dest / RECIPE_FILE).read_text())
    edit(document)
    (dest / RECIPE_FILE).write_text(json.dumps(document))
    return dest


def set_source(library: str, name: str, kwargs: dict):
    def edit(document: dict) -> None:
        document["recipe"]["source"] = {"library": library, "name": name, "kwargs": kwargs}

    return edit


def cli_error(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], env=ENV)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return result.exit_code, lines[0]


# -- user factories named by a recipe ---------------------------------------------------
@pytest.mark.parametrize(
    ("name", "kwargs_of"),
    [
        ("os:system", lambda m: {"command": f"touch {m}"}),
        ("subprocess:getoutput", lambda m: {"cmd": f"touch {m}"}),
    ],
)
def test_recipe_naming_a_library_function_is_refused_before_any_call(saved, tmp_path, name, kwargs_of):
    marker = tmp_path / "PWNED"
    folder = tampered(saved, tmp_path / "evil", set_source("user", name, kwargs_of(marker)))
    with pytest.raises(UntrustedCodeError, match=f"import module '{name.split(':')[0]}' and call {name.split(':')[1]}"):
        dynoswap.load(folder)
    assert not marker.exists()
    code, line = cli_error("inspect", folder)
    assert code == 2 and "refused to import module" in line and "--trust-code" in line
    assert not marker.exists()


PAYLOAD = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")

def factory(num_classes=10):
    from dynoswap.train.models import small_vgg
    return small_vgg(num_classes)

import torch

class Leaf(torch.nn.Module):
    pass
"""


def test_module_shipped_inside_the_folder_is_never_imported(saved, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    folder = tampered(saved, tmp_path / "evilmodel", set_source("user", "payload:factory", {"num_classes": 10}))
    (folder / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    (tmp_path / "payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    # From the folder's parent, as `python -m` puts the working directory on sys.path.
    for cwd in (tmp_path, folder):
        proc = subprocess.run(
            [sys.executable, "-m", "dynoswap", "inspect", str(folder)],
            capture_output=True,
            text=True,
            cwd=cwd,
            env={**os.environ, **ENV, "PYTHONPATH": str(Path(dynoswap.__file__).parents[1])},
            timeout=300,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            "error: refused to import module 'payload' and call factory(**{'num_classes': 10}) "
            f"(in {folder / RECIPE_FILE}): user code runs only when you trust it (trust_code=True); "
            "pass --trust-code only if you trust where it came from"
        ]
        assert not marker.exists()


@pytest.mark.parametrize("leaf", ["class:this:s", "class:payload_leaf:Leaf", "class:os:system"])
def test_leaf_modules_outside_trusted_packages_are_never_imported(saved, tmp_path, monkeypatch, leaf):
    marker = tmp_path / "LEAF_IMPORTED"
    (tmp_path / "payload_leaf.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("this", "payload_leaf"):
        monkeypatch.delitem(sys.modules, name, raising=False)

    def edit(document: dict) -> None:
        document["recipe"]["options"]["leaf_modules"] = [leaf]

    folder = tampered(saved, tmp_path / "evil", edit)
    with pytest.raises(UntrustedCodeError, match=f"refused leaf module '{leaf}'.*would import module"):
        dynoswap.load(folder)
    assert "this" not in sys.modules and "payload_leaf" not in sys.modules
    assert not marker.exists()


def test_leaf_class_of_a_trusted_package_loads_without_import(saved, tmp_path):
    def edit(document: dict) -> None:
        document["recipe"]["options"]["leaf_modules"] = ["class:torch.nn.modules.batchnorm:BatchNorm2d"]

    folder = tampered(saved, tmp_path / "ok", edit)
    gm = dynoswap.load(folder)
    assert [type(m).__name__ for m in gm.modules()].count("BatchNorm2d") > 0
    # A trusted package's module that the model never imported is not imported on a recipe's say-so either.
    sys.modules.pop("torch.utils.bottleneck", None)

    def edit_unimported(document: dict) -> None:
        document["recipe"]["options"]["leaf_modules"] = ["class:torch.utils.bottleneck:Anything"]

    folder = tampered(saved, tmp_path / "unimported", edit_unimported)
    with pytest.raises(UntrustedCodeError, match="not imported by the model"):
        dynoswap.load(folder)
    assert "torch.utils.bottleneck" not in sys.modules


# -- kwargs that download or read files ------------------------------------------------
@pytest.fixture
def no_fetch(monkeypatch, tmp_path):
    """Make any download or checkpoint read by torchvision/timm leave a marker."""
    import timm.models._builder as timm_builder
    import torch.hub

    marker = tmp_path / "FETCHED"

    def fetch(*args, **kwargs):
        marker.write_text(repr(args))
        raise RuntimeError("fetch attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fetch)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fetch)
    monkeypatch.setattr(timm_builder, "load_checkpoint", fetch, raising=False)
    monkeypatch.setattr(timm_builder, "load_pretrained", fetch, raising=False)
    return marker


@pytest.mark.parametrize(
    ("library", "name", "kwargs", "named"),
    [
        ("torchvision", "resnet18", {"weights": "DEFAULT"}, "weights"),
        ("torchvision", "fcn_resnet50", {"weights_backbone": "DEFAULT", "num_classes": 3}, "weights_backbone"),
        ("timm", "resnet18", {"pretrained": True}, "pretrained"),
        ("timm", "resnet18", {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "pretrained_cfg_overlay"),
    ],
)
def test_download_kwargs_are_refused(saved, tmp_path, no_fetch, library, name, kwargs, named):
    folder = tampered(saved, tmp_path / "evil", set_source(library, name, kwargs))
    with pytest.raises(UntrustedCodeError, match=f"{named} would download or read files"):
        dynoswap.load(folder)
    with pytest.raises(UntrustedCodeError, match="would download or read files"):
        build_model(library, name, kwargs, trust_code=True)  # never, not even for trusted code
    assert not no_fetch.exists()


def test_local_file_kwargs_are_refused_and_the_file_is_never_opened(saved, tmp_path, no_fetch):
    secret = tmp_path / "secret.pth"
    torch.save({"fc.weight": torch.zeros(10, 512)}, secret)
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if event == "open" and args and str(args[0]) == str(secret):
            opened.append(event)

    sys.addaudithook(audit)
    for kwargs, named in (
        ({"checkpoint_path": str(secret)}, "checkpoint_path"),
        ({"img_size": str(secret)}, "img_size"),
    ):
        folder = tampered(saved, tmp_path / f"evil-{named}", set_source("timm", "resnet18", kwargs))
        with pytest.raises(UntrustedCodeError, match=named):
            dynoswap.load(folder)
    code, line = cli_error("inspect", "timm:resnet18", "--model-kwargs", f"checkpoint_path={secret}")
    assert code == 2 and "checkpoint_path would download or read files" in line
    assert opened == [] and not no_fetch.exists()


def test_download_kwargs_that_ask_for_nothing_are_harmless(no_fetch):
    model = build_model("torchvision", "resnet18", {"weights": None, "num_classes": 3})
    assert model.fc.out_features == 3
    assert build_model("timm", "resnet18", {"pretrained": False, "num_classes": 3}).fc.out_features == 3
    assert not no_fetch.exists()


def test_architecture_kwargs_pass_and_others_need_trust():
    model = build_model("timm", "resnet18", {"num_classes": 4, "drop_rate": 0.1, "in_chans": 1})
    assert model.conv1.in_channels == 1 and model.fc.out_features == 4
    with pytest.raises(UntrustedCodeError, match="norm_layer is not an architecture argument"):
        build_model("timm", "resnet18", {"norm_layer": "batchnorm"})


def test_unknown_names_are_refused_through_the_registries(saved, tmp_path):
    folder = tampered(saved, tmp_path / "evil", set_source("torchvision", "os.system", {}))
    with pytest.raises(dynoswap.models.ModelError, match="unknown torchvision model 'os.system'"):
        dynoswap.load(folder)
    folder = tampered(saved, tmp_path / "saved-src", set_source("saved", "/tmp/x", {}))
    with pytest.raises(dynoswap.errors.RecipeError, match="recipe.source.library"):
        dynoswap.load(folder)


def test_config_naming_user_code_is_refused():
    with pytest.raises(UntrustedCodeError, match="backbone 'evil_pkg.mod:factory' names user code"):
        parse_preset({"backbone": "evil_pkg.mod:factory"}, "evil.yaml")
    assert parse_preset({"backbone": "evil_pkg.mod:factory"}, "ok.yaml", trust_code=True).backbone
    with pytest.raises(PresetError, match="'input_size' must be two positive integers"):
        parse_preset({"convert": {"input_size": [0, -1]}}, "bad.yaml")


# -- the positive control: trusted code does run ------------------------------------------
FACTORY = """
import pathlib
from torch import nn

def make(num_classes=3):
    pathlib.Path({marker!r}).write_text("factory ran")
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
"""


def test_trusted_factory_runs_and_round_trips(tmp_path, monkeypatch):
    marker = tmp_path / "FACTORY_RAN"
    (tmp_path / "my_factory_mod.py").write_text(FACTORY.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_factory_mod", raising=False)
    with pytest.raises(UntrustedCodeError):
        resolve("my_factory_mod:make", num_classes=3)
    assert not marker.exists() and "my_factory_mod" not in sys.modules
    model, source = resolve("my_factory_mod:make", num_classes=3, trust_code=True)
    assert marker.exists()
    gm, _ = dynoswap.convert(model, (24, 24), source=source)
    folder = dynoswap.save(gm, tmp_path / "m")
    marker.unlink()
    with pytest.raises(UntrustedCodeError, match="import module 'my_factory_mod' and call make"):
        dynoswap.load(folder)
    assert not marker.exists()
    loaded = dynoswap.load(folder, trust_code=True)
    assert marker.exists()
    x = torch.randn(2, 3, 24, 24)
    gm.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(gm(x), loaded(x))
    result = runner.invoke(app, ["inspect", str(folder), "--trust-code", "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["dynopools"]


def test_older_saves_naming_a_zoo_factory_as_user_code_still_load(saved, tmp_path):
    folder = tampered(
        saved, tmp_path / "old", set_source("user", "dynoswap.train.models:small_vgg", {"num_classes": 10})
    )
    assert list(dynoswap.load(folder).state_dict()) == list(dynoswap.load(saved).state_dict())
