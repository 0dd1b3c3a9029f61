"""Training never loses or silently corrupts a run: occupied --out, log committed with the checkpoint, hashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.errors import CheckpointError, OutputExistsError
from dynoswap.train import fit, read_log
from dynoswap.train.checkpointing import find_checkpoint, load_checkpoint, prepare_run_folder

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
ROOT = str(Path(dynoswap.__file__).parents[1])
runner = CliRunner()

SETUP = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, Subset
    from dynoswap.engine import convert
    from dynoswap.models import ModelSource
    from dynoswap.train import load_data

    def model():
        torch.manual_seed(0)
        source = ModelSource("dynoswap", "vgg-tiny", {"widths": [8, 16]})
        gm, _ = convert(source.build(), (32, 32), source=source)
        return gm

    def loader():
        torch.manual_seed(0)
        return DataLoader(Subset(load_data("barcodes").train, range(64)), batch_size=16, shuffle=True, drop_last=True)

    KWARGS = dict(epochs=3, lam=10.0, lr=0.05, alpha_lr=0.1, max_steps=2, progress=False)
    """
)

KILL_BEFORE_LOG = SETUP + textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from dynoswap.train import checkpointing, fit

    out = Path(sys.argv[1])
    real = checkpointing._write_text_atomic

    def write(path, text):
        # Epoch 2's checkpoint is in place; die before the run's log.jsonl gets its line.
        if path == out / "log.jsonl" and len(text.splitlines()) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, text)

    checkpointing._write_text_atomic = write
    fit(model(), loader(), out=out, **KWARGS)
    """
)


def train_args(out: Path) -> list[str]:
    return ["train", "vgg-tiny", "--data", "barcodes", "--max-steps", "2", "--batch-size", "16", "--epochs", "1"] + [
        "--no-progress",
        "--model-kwargs",
        "widths=[8, 16]",
        "--out",
        str(out),
    ]


def error_line(result) -> str:
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_an_existing_run_is_refused_without_resume_or_force(tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, train_args(out), env=ENV).exit_code == 0
    log = (out / "log.jsonl").read_text()
    again = runner.invoke(app, train_args(out), env=ENV)
    assert again.exit_code == 2
    assert "already holds a training run (log.jsonl, checkpoint)" in error_line(again)
    assert error_line(again).endswith("; pass --resume to continue it or --force to start it over")
    assert (out / "log.jsonl").read_text() == log
    both = runner.invoke(app, [*train_args(out), "--resume", "--force"], env=ENV)
    assert both.exit_code == 2 and "not both" in error_line(both)
    (out / "notes.txt").write_text("mine")
    forced = runner.invoke(app, [*train_args(out), "--force"], env=ENV)
    assert forced.exit_code == 0, forced.output
    assert [r["epoch"] for r in read_log(out)] == [1] and (out / "notes.txt").read_text() == "mine"
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(OutputExistsError, match="is a file"):
        prepare_run_folder(file, force=True)


def test_killed_between_checkpoint_and_log_then_resumed_log_is_complete(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_BEFORE_LOG, str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ROOT},
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [r["epoch"] for r in read_log(out)] == [1]  # the line of epoch 2 never reached the run's log
    folder = find_checkpoint(out)
    assert folder is not None and json.loads((folder / "manifest.json").read_text())["epoch"] == 2
    committed = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    namespace: dict = {}
    exec(SETUP, namespace)
    records = fit(namespace["model"](), namespace["loader"](), out=out, resume=True, **namespace["KWARGS"])
    assert [r["epoch"] for r in records] == [3]
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[:2] == committed


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    namespace: dict = {}
    exec(SETUP, namespace)
    out = tmp_path_factory.mktemp("run") / "run"
    fit(namespace["model"](), namespace["loader"](), out=out, **{**namespace["KWARGS"], "epochs": 2})
    return out


def copy_run(src: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(src, dest)
    return dest


def test_scrambled_weights_are_refused_with_the_file_and_the_earlier_checkpoint_named(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    weights = out / "checkpoint" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(255 - b for b in data[-64:])  # the header stays valid: only a hash can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as info:
        find_checkpoint(out)
    message = str(info.value)
    assert f"{weights} does not match its recorded sha256" in message
    assert f"an earlier intact checkpoint (epoch 1) is in {out / 'checkpoint.prev'}" in message
    namespace: dict = {}
    exec(SETUP, namespace)
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        load_checkpoint(out / "checkpoint", namespace["model"]())
    result = runner.invoke(app, [*train_args(out), "--epochs", "3", "--resume"], env=ENV)
    assert result.exit_code == 1 and "does not match its recorded sha256" in error_line(result)


def test_empty_train_state_and_missing_manifest_are_refused(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    (out / "checkpoint" / "train_state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="train_state.pt does not match its recorded sha256"):
        find_checkpoint(out)
    (out / "checkpoint" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="has no manifest.json"):
        find_checkpoint(out)


def test_a_kill_between_the_renames_resumes_from_the_previous_checkpoint(two_epochs, tmp_path):
    out = copy_run(two_epochs, tmp_path / "run")
    import shutil

    shutil.rmtree(out / "checkpoint")  # the state between "checkpoint -> prev" and "tmp -> checkpoint"
    assert find_checkpoint(out) == out / "checkpoint.prev"
    namespace: dict = {}
    exec(SETUP, namespace)
    records = fit(namespace["model"](), namespace["loader"](), out=out, resume=True, **namespace["KWARGS"])
    assert [r["epoch"] for r in records] == [2, 3]
    assert [r["epoch"] for r in read_log(out)] == [1, 2, 3]
