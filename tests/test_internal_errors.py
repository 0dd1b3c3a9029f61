"""Internal bugs are not the user's fault: they keep their type, exit 70 and say they are a dynoswap bug.

Each test injects a bug (an ``AttributeError`` raised inside dynoswap's own code) where a broad
``except`` used to turn it into a user-input error (``RecipeError``, ``ModelError``, a ``TieError``
refusal) or a plain failure, and checks the exact type and exit code that come out.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dynoswap
from dynoswap import errors
from dynoswap.cli import app
from dynoswap.cli.common import DEBUG_ENV, EXIT_FAILURE, EXIT_INTERNAL, EXIT_USAGE, exit_code_of
from dynoswap.engine import TieError
from dynoswap.graph import WorldRunner
from dynoswap.models import ModelSource
from dynoswap.sources import build_model

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
SOURCE = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10, "widths": [8, 16]})
BUG = "injected bug"
runner = CliRunner()
convert_module = importlib.import_module("dynoswap.engine.convert")
propagate = importlib.import_module("dynoswap.graph.propagate")


def _bug(*args: object, **kwargs: object) -> None:
    raise AttributeError(BUG)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    gm, _ = dynoswap.convert(SOURCE.build(), (32, 32), source=SOURCE)
    return dynoswap.save(gm, tmp_path_factory.mktemp("internal") / "m")


def test_unknown_exceptions_exit_70_and_os_errors_1():
    assert exit_code_of(AttributeError("x")) == EXIT_INTERNAL == 70
    assert exit_code_of(KeyError("x")) == EXIT_INTERNAL
    assert exit_code_of(TypeError("x")) == EXIT_INTERNAL  # a library TypeError reaching the CLI is a CLI bug
    assert exit_code_of(ValueError("x")) == EXIT_INTERNAL
    assert exit_code_of(PermissionError(13, "Permission denied")) == EXIT_FAILURE
    assert exit_code_of(errors.OptionError("x")) == EXIT_USAGE


def test_a_bug_while_load_replays_the_conversion_keeps_its_type(saved, monkeypatch):
    monkeypatch.setattr(convert_module, "apply_sites", _bug)
    with pytest.raises(AttributeError, match=BUG):
        dynoswap.load(saved)


def test_inspect_of_a_saved_folder_reports_a_bug_as_internal(saved, monkeypatch):
    monkeypatch.setattr(convert_module, "apply_sites", _bug)
    result = runner.invoke(app, ["inspect", str(saved)], env=ENV)
    assert result.exit_code == EXIT_INTERNAL, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines == [
        f"error: internal error (AttributeError: {BUG}): this is a dynoswap bug, not a problem with your input; "
        f"please report it with the command you ran and the traceback that --debug (or {DEBUG_ENV}=1) shows"
    ]
    assert "recipe.json" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_bug_with_its_traceback(saved, monkeypatch, how):
    monkeypatch.setattr(convert_module, "apply_sites", _bug)
    args, env = ["inspect", str(saved)], dict(ENV)
    if how == "flag":
        args.append("--debug")
    else:
        env[DEBUG_ENV] = "1"
    result = runner.invoke(app, args, env=env)
    assert isinstance(result.exception, AttributeError) and str(result.exception) == BUG
    frames = [f.name for f in __import__("traceback").extract_tb(result.exc_info[2])]
    assert "_bug" in frames and "load" in frames  # the whole way from the command to the bug


def test_a_bug_during_convert_is_not_a_refusal(monkeypatch):
    monkeypatch.setattr(propagate, "pool_size", _bug)  # the runner's own size rule, in every world
    with pytest.raises(AttributeError, match=BUG):
        dynoswap.convert(SOURCE.build(), (32, 32))
    result = runner.invoke(app, ["convert", "vgg-tiny", "--input-size", "32", "32"], env=ENV)
    assert result.exit_code == EXIT_INTERNAL, result.output


def test_a_bug_inside_a_tie_probe_propagates(monkeypatch):
    """The probes that rerun an op with mended inputs may swallow the op's answer, never a bug."""
    import torchvision

    compute = WorldRunner.compute
    probed: list[str] = []

    def buggy(self, node, world, args, kwargs):
        caller = sys._getframe(1).f_code.co_name
        if caller in ("_patched", "_minimum_size"):
            probed.append(caller)
            raise AttributeError(BUG)
        return compute(self, node, world, args, kwargs)

    monkeypatch.setattr(WorldRunner, "compute", buggy)
    with pytest.raises(AttributeError, match=BUG):
        dynoswap.convert(torchvision.models.resnet18(num_classes=10), (64, 64))
    assert probed  # resnet18's residual adds are tied through the probe


def test_a_model_that_breaks_when_scales_move_is_still_a_refusal():
    """The other side: the op's own answer stays a named refusal."""

    class FixedAdd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = torch.nn.MaxPool2d(2)
            self.bias = torch.nn.Parameter(torch.zeros(1, 3, 16, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pool(x) + self.bias

    with pytest.raises(TieError) as info:
        dynoswap.convert(FixedAdd(), (32, 32))
    assert exit_code_of(info.value) == EXIT_FAILURE


def test_a_bug_in_dynoswaps_own_zoo_is_not_a_model_error(monkeypatch):
    models = importlib.import_module("dynoswap.train.models")
    monkeypatch.setattr(models, "small_vgg", _bug)
    with pytest.raises(AttributeError, match=BUG):
        build_model("dynoswap", "vgg-tiny", {"num_classes": 10})


def test_bad_arguments_to_a_model_are_still_a_model_error():
    with pytest.raises(errors.ModelError, match="cannot build dynoswap:vgg-tiny") as info:
        build_model("dynoswap", "vgg-tiny", {"widths": "wide"})
    assert isinstance(info.value.__cause__, (TypeError, ValueError))  # the cause is chained, not hidden
    with pytest.raises(errors.ModelError, match="cannot build torchvision:resnet18"):
        build_model("torchvision", "resnet18", {"num_classes": -3})


def test_a_recipe_that_does_not_replay_is_a_recipe_error_with_its_cause(saved, tmp_path, monkeypatch):
    def refuse(*args: object, **kwargs: object) -> None:
        raise errors.OptionError("refused by the engine")

    monkeypatch.setattr(convert_module, "apply_sites", refuse)
    with pytest.raises(errors.RecipeError, match="cannot be replayed: refused by the engine") as info:
        dynoswap.load(saved)
    assert isinstance(info.value.__cause__, errors.OptionError)
    result = runner.invoke(app, ["inspect", str(saved)], env=ENV)
    assert result.exit_code == EXIT_USAGE and "cannot be replayed" in result.stderr


def test_a_bug_while_save_reads_back_is_not_a_save_error(tmp_path, monkeypatch):
    gm, _ = dynoswap.convert(SOURCE.build(), (32, 32), source=SOURCE)
    monkeypatch.setattr(convert_module, "apply_sites", _bug)  # the read-back replays the conversion
    with pytest.raises(AttributeError, match=BUG):
        dynoswap.save(gm, tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing half-written is left at the path
