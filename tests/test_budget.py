"""Training to a GMACs budget, scale bounds and the training output a person reads."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from dynoswap.cost import alphas, count_gmacs, gmacs_loss
from dynoswap.engine import convert
from dynoswap.models import ModelSource
from dynoswap.train import fit, load_data, make_loaders, probe_pools
from dynoswap.train.budget import BudgetController, land_on_budget, scale_bounds
from dynoswap.train.loop import epoch_line, group_sizes


def _setup(dataset: str, seed: int = 0):
    torch.manual_seed(seed)
    bundle = load_data(dataset, seed=seed)
    source = ModelSource("dynoswap", "vgg-tiny", {"num_classes": bundle.num_classes})
    gm, _ = convert(source.build(), bundle.input_size, source=source)
    train, val = make_loaders(bundle, 64, seed=seed)
    return bundle, gm, train, val


@pytest.mark.parametrize("dataset", ["barcodes", "digits-stretch"])
@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_final_gmacs_land_within_three_percent_of_the_target(dataset, fraction):
    bundle, gm, train, val = _setup(dataset)
    target = fraction * float(gmacs_loss(gm).detach())
    records = fit(
        gm, train, val, epochs=4, lr=0.05, alpha_lr=0.02, max_steps=12, input_size=bundle.input_size,
        progress=False, target_gmacs=target,
    )  # fmt: skip
    final = count_gmacs(gm, bundle.input_size).total
    assert abs(final / target - 1) <= 0.03, (final, target)
    assert records[-1]["gmacs"] == pytest.approx(final, rel=1e-6)
    assert all(r["target_gmacs"] == target for r in records)
    # lambda is logged for every step, and it moved (it is adapted, not fixed).
    assert [len(r["lambda_steps"]) for r in records] == [12] * 4
    steps = [lam for r in records for lam in r["lambda_steps"]]
    assert len(set(steps)) > 5


def test_controller_pushes_towards_the_target_and_resumes():
    ctl = BudgetController(2.0, ki=0.1, kp=1.0)
    assert ctl.update(3.0) > 0  # over budget: positive weight shrinks the model
    ctl2 = BudgetController(2.0, ki=0.1, kp=1.0)
    assert ctl2.update(1.0) < 0  # under budget: the weight turns negative and grows it
    ctl.update(2.5, lr_factor=0.5)
    twin = BudgetController(1.0)
    twin.load_state_dict(ctl.state_dict())
    assert twin.update(2.2) == ctl.update(2.2)
    # A decayed learning rate is compensated: the same error gives a larger weight.
    a, b = BudgetController(1.0, ki=0.0, kp=1.0), BudgetController(1.0, ki=0.0, kp=1.0)
    assert b.update(1.5, lr_factor=0.25) == pytest.approx(4 * a.update(1.5))
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="target GMACs"):
            BudgetController(bad)


def test_land_on_budget_picks_integer_sizes_closest_to_the_target():
    bundle, gm, _, _ = _setup("barcodes")
    g0 = float(gmacs_loss(gm).detach())
    with torch.no_grad():
        for i, row in enumerate(alphas(gm)):
            gm.get_submodule(row["group"]).alpha.copy_(torch.tensor([2.3 + 0.1 * i, 2.1 + 0.2 * i]))
    target = 0.45 * g0
    sizes = land_on_budget(gm, target)
    assert sizes is not None and len(sizes) == 3
    assert [tuple(r["out_size"]) for r in alphas(gm)] == sizes
    best = abs(float(gmacs_loss(gm).detach()) / target - 1)
    assert best <= 0.03
    # The landed cost is what fvcore counts for the model as it now is.
    assert best == pytest.approx(abs(count_gmacs(gm, bundle.input_size).total / target - 1), abs=1e-9)


def test_scale_bounds_hold_on_both_axes_of_every_group():
    bundle, gm, train, _ = _setup("barcodes")
    # A large lambda drives every scale down; the lower bound stops it.
    fit(gm, train, None, epochs=1, lam=50.0 / float(gmacs_loss(gm).detach()), lr=0.05, alpha_lr=0.5,
        max_steps=6, input_size=bundle.input_size, progress=False, min_scale=0.4, max_scale=0.6)  # fmt: skip
    scales = [s for _, p in gm.named_modules() if hasattr(p, "scale") and hasattr(p, "alpha") for s in p.scale]
    assert scales and all(0.4 - 1e-6 <= s <= 0.6 + 1e-6 for s in scales)
    assert min(scales) == pytest.approx(0.4, abs=1e-6)
    assert scale_bounds(None, None) is None
    assert scale_bounds(0.25, 1.0) == (1.0, 4.0)
    with pytest.raises(ValueError, match="larger than max_scale"):
        scale_bounds(0.8, 0.5)


def test_progress_is_plain_lines_in_order_when_not_a_terminal():
    bundle, gm, train, val = _setup("barcodes")
    buffer = io.StringIO()
    console = Console(file=buffer, width=200, force_terminal=False)
    fit(gm, train, val, epochs=2, lr=0.05, alpha_lr=0.02, max_steps=8, input_size=bundle.input_size,
        progress=True, console=console)  # fmt: skip
    lines = buffer.getvalue().splitlines()
    assert [line.strip().split("  ")[0] for line in lines] == (
        ["epoch 1/2 step 2/8", "epoch 1/2 step 4/8", "epoch 1/2 step 6/8", "epoch 1/2 step 8/8", "epoch 1/2"]
        + ["epoch 2/2 step 2/8", "epoch 2/2 step 4/8", "epoch 2/2 step 6/8", "epoch 2/2 step 8/8", "epoch 2/2"]
    )
    assert "train_acc" in lines[0] and " acc " not in lines[0]
    assert "train_acc" in lines[4] and "val_acc" in lines[4] and " acc " not in lines[4]


def test_sizes_are_one_per_tie_group_in_execution_order():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    gm, report = convert(model, (64, 64))
    pools = probe_pools(gm, (64, 64), torch.device("cpu"))
    # Execution order: the merged stem first, whatever its module name sorts as.
    assert [p["name"] for p in pools] == [r["name"] for r in alphas(gm, (64, 64))]
    groups = group_sizes(pools)
    assert len(groups) == len(report.groups)
    assert [size for _, size in groups] == [[16, 16], [8, 8], [4, 4], [2, 2]]
    assert [orig for _, orig in group_sizes(pools, key="original")] == [[16, 16], [8, 8], [4, 4], [2, 2]]
    record = {"epoch": 1, "loss": 1.0, "train_acc": 0.5, "val_acc": 0.25, "gmacs": 0.1, "pools": pools}
    assert epoch_line(record, 3).endswith("sizes 16x16 8x8 4x4 2x2")


def test_train_cli_target_gmacs_reports_final_cost_and_plots(tmp_path):
    import json

    from typer.testing import CliRunner

    from dynoswap.cli import app

    runner = CliRunner()
    env = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    out = tmp_path / "run"
    args = ["train", "vgg-tiny", "--data", "barcodes", "--epochs", "2", "--max-steps", "6", "--batch-size", "32"]
    args += ["--target-gmacs", "0.002", "--max-scale", "0.6", "--out", str(out), "--plot", str(tmp_path / "p.png")]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "target 0.002 GMACs (lambda adapted per step)" in result.stdout
    assert "final GMACs" in result.stdout and "train_acc" in result.stdout and "val_acc" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [len(r["lambda_steps"]) for r in log] == [6, 6]
    assert [p["out"] for p in log[0]["initial_pools"]] == [[16, 16], [8, 8], [4, 4]]
    assert all(s <= 0.6 + 1e-6 for p in log[-1]["pools"] for s in p["scale"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

    help_text = runner.invoke(app, ["train", "--help"], env=env).stdout
    assert "--target-gmacs" in help_text and "2.2e-4" in help_text

    bad = runner.invoke(app, ["train", "vgg-tiny", "--data", "barcodes", "--target-gmacs", "-1"], env=env)
    assert bad.exit_code == 2 and "--target-gmacs must be > 0" in bad.output
    bad = runner.invoke(app, ["train", "vgg-tiny", "--data", "barcodes", "--min-scale", "0.8", "--max-scale", "0.5"])
    assert bad.exit_code == 2 and "larger than --max-scale" in bad.output
    no_weights = runner.invoke(
        app, ["train", "vgg-tiny", "--data", "barcodes", "--pretrained", "--out", str(tmp_path / "x")]
    )
    assert no_weights.exit_code != 0 and "no pretrained weights for dynoswap:vgg-tiny" in no_weights.output
    assert "Traceback" not in no_weights.output
