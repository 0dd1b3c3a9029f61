"""Issue 20: bad arguments answered before torch loads, a training run folder used as a model, clear messages.

Exit codes are the README's table (``dynoswap/cli/common.py``): 2 bad input, 1 failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.cli.common import EXIT_FAILURE, EXIT_USAGE, exit_code_of
from dynoswap.cli.train import next_steps
from dynoswap.errors import CheckpointError, ConversionError, ModelError
from dynoswap.io.run import is_run_folder, run_model_folder, saved_model_folder

ROOT = Path(__file__).parents[1]
ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
runner = CliRunner()

#: Runs the CLI and reports, at exit, whether torch was imported.
PROBE = (
    "import atexit, sys\n"
    "atexit.register(lambda: sys.stderr.write(f\"TORCH={'torch' in sys.modules}\\n\"))\n"
    "from dynoswap.cli import main\n"
    "sys.argv = ['dynoswap', *sys.argv[1:]]\n"
    "main()\n"
)


def run_cli_bare(args: list[str], cwd: Path) -> tuple[int, list[str], bool]:
    """Run ``dynoswap ARGS`` in a fresh interpreter: exit code, ``error:`` lines, whether torch was imported."""
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    return proc.returncode, errors, "TORCH=True" in proc.stderr


BAD_ARGUMENTS = [
    (["convert", "resnet50", "--input-size", "0", "0"], "--input-size must be positive integers, got"),
    (["convert", "resnet50", "--weights", "nope.pth"], "--weights nope.pth: no such file"),
    (["convert", "resnet50", "--weights", "."], "--weights . is a folder, not a file"),
    (["convert", "resnet50", "--head", "wide"], "--head must be none or adapt"),
    (["convert", "resnet50", "--placement", "mid"], "--placement must be one of post, pre"),
    (["convert", "resnet50", "--init-scale", "nan"], "--init-scale must be a finite number"),
    (["convert", "resnet50", "--sizes", "1x1"], "cannot be hit exactly"),
    (["convert", "resnet50", "--config", "nope.yaml"], "nope.yaml does not exist"),
    (["convert", "resnet50", "--latency-table", "nope.json"], "--latency-table nope.json: no such file"),
    (["inspect", "resnet50", "--weights", "nope.pth"], "--weights nope.pth: no such file"),
    (["inspect", "resnet50", "--input-size", "5", "0"], "--input-size must be positive integers, got"),
    (["export", "resnet50", "-o", "m.onnx", "--format", "tflite"], "--format must be one of onnx, pt2"),
    (["export", "resnet50", "-o", "m.pt2"], "a onnx file must be named *.onnx"),
    (["export", "resnet50", "-o", "m.onnx", "--weights", "nope.pth"], "--weights nope.pth: no such file"),
    (["profile", "resnet50", "-o", "t.json", "--placement", "mid"], "--placement must be one of post, pre"),
    (["paper", "table1", "--dataset", "mnist"], "not a data set of the paper"),
    (["train", "vgg-tiny", "--data", "mnist"], "unknown data 'mnist'"),
    (["train", "vgg-tiny", "--data", "imagefolder:nope"], "imagefolder: folder nope does not exist"),
    (["train", "vgg-tiny", "--data", "barcodes", "--lr", "nan"], "--lr must be a finite number >= 0"),
    (
        ["train", "vgg-tiny", "--data", "barcodes", "--input-size", "0", "8"],
        "--input-size must be positive integers, got 0 8",
    ),
    (["train", "vgg-tiny", "--data", "barcodes", "--warmup", "0.9"], "--warmup 0.9 ends after --search-end"),
    (["train", "vgg-tiny", "--data", "barcodes", "--floor-gradient", "x"], "--floor-gradient must be pass or stop"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ARGUMENTS, ids=[" ".join(a[:1] + a[2:]) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_exits_2_before_torch_is_imported(tmp_path, args, message):
    code, errors, imported_torch = run_cli_bare(args, tmp_path)
    assert code == EXIT_USAGE and len(errors) == 1 and message in errors[0], errors
    assert not imported_torch, f"{args} imported torch before refusing the argument"
    assert list(tmp_path.iterdir()) == []  # nothing written either


def test_an_existing_run_is_refused_before_torch_is_imported(trained, tmp_path):
    code, errors, imported_torch = run_cli_bare(
        ["train", "vgg-tiny", "--data", "barcodes", "--out", str(trained[0])], tmp_path
    )
    assert code == EXIT_USAGE and not imported_torch
    assert errors == [
        f"error: {trained[0]} already holds a training run (log.jsonl, checkpoint): continue it (resume=True) or "
        "start it over (force=True); pass --resume to continue it or --force to start it over"
    ]


def test_the_probe_sees_torch_when_a_command_does_work(tmp_path):
    # The control: a valid command that needs torch is reported as importing it.
    code, errors, imported_torch = run_cli_bare(["inspect", "vgg-tiny", "--input-size", "32", "32", "--json"], tmp_path)
    assert code == 0 and not errors and imported_torch


# -- a training run folder is a model ---------------------------------------------------------------
def train_args(out: Path) -> list[str]:
    return ["train", "vgg-tiny", "--data", "barcodes", "--max-steps", "1", "--batch-size", "16", "--epochs", "1"] + [
        "--no-progress",
        "--model-kwargs",
        "widths=[8, 16]",
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("runs") / "bars"
    result = runner.invoke(app, train_args(out), env=ENV)
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_train_ends_with_where_the_model_is_and_the_next_command(trained):
    out, stdout = trained
    lines = stdout.strip().splitlines()
    assert lines[-3:] == [
        f"model: {out / 'checkpoint' / 'model'} (the final epoch's)",
        f"next: dynoswap export {out} -o bars.onnx",
        f"(dynoswap inspect {out} and dynoswap.load('{out}') take the run folder too)",
    ]
    assert next_steps(out) == lines[-3:]


def test_load_inspect_and_export_take_a_run_folder(trained, tmp_path):
    out, _ = trained
    assert is_run_folder(out) and run_model_folder(out) == saved_model_folder(out) == out / "checkpoint" / "model"
    from_run, from_folder = dynoswap.load(out), dynoswap.load(out / "checkpoint" / "model")
    state = from_folder.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in from_run.state_dict().items()) and from_run.state_dict().keys()
    inspected = runner.invoke(app, ["inspect", str(out), "--json"], env=ENV)
    direct = runner.invoke(app, ["inspect", str(out / "checkpoint" / "model"), "--json"], env=ENV)
    assert inspected.exit_code == direct.exit_code == 0, inspected.output
    a, b = json.loads(inspected.stdout), json.loads(direct.stdout)
    assert a.pop("model") == str(out) and b.pop("model") == str(out / "checkpoint" / "model") and a == b
    exported = runner.invoke(app, ["export", str(out), "-f", "pt2", "-o", str(tmp_path / "bars.pt2")], env=ENV)
    assert exported.exit_code == 0, exported.output
    assert exported.stdout.splitlines()[1].startswith("input: (1, 3, 32, 32); ")  # the real channel count, not C


def test_training_a_runs_model_goes_to_another_run_folder(trained, tmp_path):
    out, _ = trained
    same = runner.invoke(app, ["train", str(out), "--data", "barcodes", "--out", str(out), "--force"], env=ENV)
    assert same.exit_code == EXIT_USAGE and "give another --out for the new run" in same.stderr
    assert run_model_folder(out).is_dir()  # --force removed nothing
    args = ["train", str(out), "--data", "barcodes", "--out", str(tmp_path / "again"), "--epochs", "1"]
    again = runner.invoke(app, [*args, "--max-steps", "1", "--batch-size", "16", "--no-progress"], env=ENV)
    assert again.exit_code == 0, again.output
    assert f"training {out} on barcodes" in again.stdout


def copy_run(out: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(out, copy, symlinks=True)
    return copy


def test_a_damaged_run_checkpoint_is_refused_and_names_the_earlier_one(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    weights = run / "checkpoint" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="does not match its recorded sha256; no earlier intact checkpoint"):
        dynoswap.load(run)
    (run / "checkpoint").rename(run / "checkpoint.prev")  # a kill between the two renames of a save
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        dynoswap.load(run)
    result = runner.invoke(app, ["inspect", str(run)], env=ENV)
    assert result.exit_code == EXIT_FAILURE and "recorded sha256" in result.stderr


def test_a_linked_run_checkpoint_is_refused(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    (run / "checkpoint").rename(tmp_path / "elsewhere")
    (run / "checkpoint").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="is a link, not the run's checkpoint folder"):
        dynoswap.load(run)


def test_a_run_without_a_model_says_why(trained, tmp_path):
    run = copy_run(trained[0], tmp_path)
    import shutil

    shutil.rmtree(run / "checkpoint")
    with pytest.raises(ModelError, match="has no checkpoint yet") as info:
        dynoswap.load(run)
    assert exit_code_of(info.value) == EXIT_USAGE
    result = runner.invoke(app, ["export", str(run), "-o", str(tmp_path / "m.onnx")], env=ENV)
    assert result.exit_code == EXIT_USAGE and "has no checkpoint yet" in result.stderr


def test_a_folder_that_is_no_run_is_still_refused_as_before(tmp_path):
    (tmp_path / "notes").mkdir()
    assert not is_run_folder(tmp_path / "notes") and saved_model_folder(tmp_path / "notes") == tmp_path / "notes"
    result = runner.invoke(app, ["export", str(tmp_path / "notes"), "-o", str(tmp_path / "m.onnx")], env=ENV)
    assert result.exit_code == EXIT_USAGE and "directory without recipe.json" in result.stderr


# -- messages -----------------------------------------------------------------------------------------------
class FixedInput(nn.Module):
    """A model that asserts its input size, as ViT's patch embedding does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[2] == 32, f"Wrong image height! Expected 32 but got {x.shape[2]}!")
        return self.conv(x)


def test_a_fixed_input_size_is_refused_in_dynoswaps_words():
    with pytest.raises(ConversionError) as info:
        dynoswap.convert(FixedInput(), (32, 32))
    message = str(info.value)
    assert message.startswith("not convertible: the model asserts a fixed input size at '_assert'")
    assert "Proxy" not in message and exit_code_of(info.value) == EXIT_FAILURE
    with pytest.raises(ConversionError, match="checks its input size there and refuses this one") as info:
        dynoswap.convert(FixedInput(), (40, 40))
    assert "Proxy" not in str(info.value)


def test_a_vit_is_refused_without_torch_fx_internals():
    result = runner.invoke(app, ["convert", "timm:vit_tiny_patch16_224"], env=ENV)
    assert result.exit_code == EXIT_FAILURE
    assert "the model asserts a fixed input size at 'patch_embed._assert" in result.stderr  # _assert or _assert_1
    assert "Proxy" not in result.stderr


def test_a_one_channel_model_on_three_channel_data_is_refused_before_training(tmp_path):
    args = ["train", "vgg-tiny", "--data", "barcodes", "--model-kwargs", "in_chans=1", "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--epochs", "1", "--max-steps", "1", "--no-progress"], env=ENV)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == EXIT_USAGE and lines == [
        "error: vgg-tiny takes 1-channel images but barcodes has 3-channel images; build the model for 3 channels "
        "(timm: --model-kwargs in_chans=3) or use 1-channel data"
    ]
    assert not (tmp_path / "r" / "log.jsonl").exists()


def test_help_texts_say_what_the_commands_do():
    export_help = runner.invoke(app, ["export", "--help"], env={**ENV, "COLUMNS": "300"}).stdout
    assert "default: the size the model was frozen or converted at, else 224 224" in export_help
    train_help = " ".join(runner.invoke(app, ["train", "--help"], env={**ENV, "COLUMNS": "300"}).stdout.split())
    assert "each piece compiles once static, once dynamic, not once per size" in train_help
    assert "recompiles whenever" not in train_help


# -- inspect of a saved folder reads its files --------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    result = runner.invoke(app, ["convert", "vgg-tiny", "--input-size", "32", "24", "-o", str(folder)], env=ENV)
    assert result.exit_code == 0, result.output
    return folder


def subprocess_stdout(args: list[str], cwd: Path) -> str:
    env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dynoswap", *args], capture_output=True, text=True, env=env, cwd=cwd
    ).stdout


def test_inspect_of_a_saved_folder_shows_its_record_without_importing_torch(saved, tmp_path):
    code, errors, imported_torch = run_cli_bare(["inspect", str(saved), "--json"], tmp_path)
    assert code == 0 and not errors and not imported_torch
    recorded = json.loads(subprocess_stdout(["inspect", str(saved), "--json"], tmp_path))
    # --strict-values reads every weight with torch: the model is built and summarised afresh.
    built = runner.invoke(app, ["inspect", str(saved), "--json", "--strict-values"], env=ENV)
    assert built.exit_code == 0 and recorded == json.loads(built.stdout)
    assert recorded["input_size"] == [32, 24] and recorded["dynopools"]


def copy_saved(saved: Path, tmp_path: Path) -> Path:
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    return folder


def rewrite_alpha(folder: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    state = load_file(str(file))
    for key in [k for k in state if k.endswith("_dynopool.alpha")]:
        state[key] = torch.full_like(state[key], value)
    save_file(state, str(file), metadata={"format": "dynoswap-saved-model"})


def test_weights_changed_after_the_record_are_inspected_by_building_the_model(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    rewrite_alpha(folder, 2.5)
    code, errors, imported_torch = run_cli_bare(["inspect", str(folder), "--json"], tmp_path)
    assert code == 0 and not errors and imported_torch
    data = json.loads(subprocess_stdout(["inspect", str(folder), "--json"], tmp_path))
    assert data["dynopools"][0]["alpha"] == [2.5, 2.5]


def test_a_damaged_alpha_is_refused_without_building(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    rewrite_alpha(folder, float("nan"))
    code, errors, imported_torch = run_cli_bare(["inspect", str(folder)], tmp_path)
    assert code == EXIT_FAILURE and len(errors) == 1 and "the file is damaged" in errors[0] and not imported_torch


def test_the_record_does_not_bypass_the_trust_policy(saved, tmp_path):
    folder = copy_saved(saved, tmp_path)
    document = json.loads((folder / "recipe.json").read_text())
    document["recipe"]["source"] = {"library": "user", "name": "evilpkg.models:make", "kwargs": {}}
    (folder / "recipe.json").write_text(json.dumps(document))
    code, errors, imported_torch = run_cli_bare(["inspect", str(folder)], tmp_path)
    assert code == EXIT_USAGE and len(errors) == 1 and "refused to import module 'evilpkg.models'" in errors[0]
    assert not imported_torch
