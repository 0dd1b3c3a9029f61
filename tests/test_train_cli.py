"""``dynoswap train`` end to end through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dynoswap.cli import app
from dynoswap.cli.train import DEFAULTS, merge_hyper
from dynoswap.presets import load_preset

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env=ENV)


def test_train_builtin_model_writes_log_checkpoint_plot_then_resumes(tmp_path):
    out = tmp_path / "run"
    common = ["vgg-tiny", "--data", "barcodes", "--max-steps", "2", "--batch-size", "16", "--out", out]
    common += ["--lam", "50", "--no-progress", "--model-kwargs", "widths=[8, 16]"]
    result = invoke("train", *common, "--epochs", "1", "--plot", tmp_path / "p.png")
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.stdout and "sizes " in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    assert len(log[0]["pools"]) == 1 and log[0]["pools"][0]["in"] == [32, 32]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoint" / "model" / "recipe.json").is_file()

    result = invoke("train", *common, "--epochs", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.stdout and "epoch 1/2" not in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and log[1]["step"] == 4

    # The saved checkpoint is a model spec: training continues from its alphas.
    result = invoke(
        "train",
        out / "checkpoint" / "model",
        "--data",
        "barcodes",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--out",
        tmp_path / "more",
        "--no-progress",
    )
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "nope"], "unknown data 'nope'"),
        (["--data", "cifar100:/nonexistent"], "does not exist"),
        (["--data", "barcodes", "--epochs", "0"], "--epochs must be >= 1"),
        (["--data", "barcodes", "--lam", "-1"], "--lam must be a finite number >= 0"),
        (["--data", "barcodes", "--lam", "inf"], "--lam must be a finite number >= 0, got inf"),
        (["--data", "barcodes", "--lr", "nan"], "--lr must be a finite number >= 0, got nan"),
        (["--data", "barcodes", "--alpha-lr", "nan"], "--alpha-lr must be a finite number >= 0, got nan"),
        (["--data", "barcodes", "--weight-decay", "-inf"], "--weight-decay must be a finite number"),
        (["--data", "barcodes", "--target-gmacs", "nan"], "--target-gmacs must be a finite number > 0, got nan"),
        (["--data", "barcodes", "--target-gmacs", "-0.01"], "--target-gmacs must be a finite number > 0"),
        (["--data", "barcodes", "--min-scale", "nan"], "--min-scale must be a finite number > 0"),
        (["--data", "barcodes", "--max-alpha-step", "inf"], "--max-alpha-step must be a finite number > 0"),
        (["--data", "barcodes", "--warmup", "0.6"], "--warmup 0.6 ends after --search-end 0.5"),
        (["--data", "barcodes", "--search-end", "2"], "--search-end is a fraction"),
        (["--data", "barcodes", "--budget-anneal", "nan"], "--budget-anneal is a fraction"),
        (["--data", "barcodes", "--budget-anneal", "-0.2"], "--budget-anneal is a fraction"),
        (["--data", "barcodes", "--floor-gradient", "maybe"], "--floor-gradient must be pass or stop"),
        (["--data", "barcodes", "--position-gradient", "centre"], "--position-gradient must be displacement or"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, message, tmp_path):
    result = invoke("train", "vgg-tiny", *args, "--out", tmp_path / "run")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_unreachable_budget_is_refused_with_the_reachable_range(tmp_path):
    # Conversion alone raises resnet18d's cost at 32x32; the cheapest it can reach is above this budget.
    result = invoke(
        "train", "timm:resnet18d", "--data", "digits-stretch", "--epochs", "3", "--max-steps", "10",
        "--target-gmacs", "0.01", "--out", tmp_path / "run", "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "out of reach" in line and "reachable range" in line and "placement 'pre'" in line
    assert not (tmp_path / "run" / "log.jsonl").exists()  # refused before any epoch


def test_resume_without_checkpoint_fails_cleanly(tmp_path):
    result = invoke("train", "vgg-tiny", "--data", "barcodes", "--out", tmp_path, "--resume", "--no-progress")
    assert result.exit_code == 1 and "no checkpoint" in result.stderr


def test_preset_hyperparameters_with_flags_winning():
    preset = load_preset("vgg16-cifar100-s")
    hyper = merge_hyper(preset, {"epochs": 3, "lr": None})
    assert hyper.epochs == 3  # flag
    assert hyper.lr == 0.1 and hyper.alpha_lr == 0.01 and hyper.lam == pytest.approx(2.2e-4)  # Tables 1-2
    assert hyper.momentum == 0.9 and hyper.weight_decay == 5e-4 and hyper.batch_size == 128
    assert merge_hyper(None, {}) == DEFAULTS
