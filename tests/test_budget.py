"""Training to a GMACs budget, scale bounds and the training output a person reads."""

from __future__ import annotations

import io
import math

import pytest
import torch
from rich.console import Console

from dynoswap.cost import alphas, count_gmacs, gmacs_loss, stage_sizes
from dynoswap.engine import convert
from dynoswap.errors import BudgetError, OptionError
from dynoswap.models import ModelSource
from dynoswap.train import fit, load_data, make_loaders, probe_pools
from dynoswap.train.budget import budget_range, land, project
from dynoswap.train.loop import epoch_line, group_sizes
from dynoswap.train.scales import AlphaStepper, ScaleGuard, leaders


def _setup(dataset: str, seed: int = 0):
    torch.manual_seed(seed)
    bundle = load_data(dataset, seed=seed)
    source = ModelSource("dynoswap", "vgg-tiny", {"num_classes": bundle.num_classes})
    gm, _ = convert(source.build(), bundle.input_size, source=source)
    train, val = make_loaders(bundle, 64, seed=seed)
    return bundle, gm, train, val


def _real(gm, size) -> float:
    return count_gmacs(gm, size).total


@pytest.mark.parametrize("dataset", ["barcodes", "digits-stretch"])
@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_final_gmacs_land_within_three_percent_of_the_target(dataset, fraction):
    bundle, gm, train, val = _setup(dataset)
    target = fraction * float(gmacs_loss(gm).detach())
    records = fit(
        gm, train, val, epochs=4, lr=0.05, alpha_lr=0.05, max_steps=12, input_size=bundle.input_size,
        progress=False, target_gmacs=target,
    )  # fmt: skip
    final = _real(gm, bundle.input_size)
    assert abs(final / target - 1) <= 0.03, (final, target)
    assert records[-1]["gmacs"] == pytest.approx(final, rel=1e-6)
    assert all(r["target_gmacs"] == target for r in records)
    # The log records the real cost every epoch; the projection keeps it on the annealed budget throughout,
    # which starts at the model's own cost and is the target from 30% of the run on (the default).
    assert all(abs(r["gmacs"] / r["budget"] - 1) <= 0.10 for r in records), [r["gmacs"] / r["budget"] for r in records]
    assert records[0]["budget"] > target  # epoch 1 ends at 25% of the run: still on the way
    assert all(abs(r["gmacs"] / target - 1) <= 0.10 for r in records[1:]), [r["gmacs"] / target for r in records]
    assert [r["phase"] for r in records] == ["search", "search", "fixed", "fixed"]
    assert [len(r["lambda_steps"]) for r in records] == [12] * 4


def test_projection_steers_the_real_cost_and_keeps_the_learned_shape():
    bundle, gm, _, _ = _setup("barcodes")
    guard = ScaleGuard.for_model(gm, lambda: [(32, 32), (16, 16), (8, 8)])
    with torch.no_grad():
        for k, g in enumerate(guard.groups):  # every group moved on its own, both axes
            g.alpha.copy_(torch.tensor([1.3 + 0.4 * k, 2.9 - 0.5 * k]))
    ratios = [float(g.alpha[0] / g.alpha[1]) for g in guard.groups]
    g0 = _real(gm, bundle.input_size)
    for fraction in (0.3, 0.55, 1.4):
        target = fraction * g0
        after = project(guard, target, lambda: float(gmacs_loss(gm).detach()))
        # The cost the model really has (fvcore at the integer sizes) is the one steered.
        assert after == pytest.approx(_real(gm, bundle.input_size), rel=1e-9)
        assert abs(after / target - 1) <= 0.06, (fraction, after / target)
        inside = [
            g
            for g, lo, hi in zip(guard.groups, guard.low, guard.high, strict=True)
            if bool(((g.alpha > lo) & (g.alpha < hi)).all())
        ]
        for g in inside:
            assert float(g.alpha[0] / g.alpha[1]) in [pytest.approx(r) for r in ratios]


def test_land_chooses_among_roundings_on_budget_by_the_task_loss():
    bundle, gm, _, _ = _setup("barcodes")
    guard = ScaleGuard.for_model(gm, lambda: [(32, 32), (16, 16), (8, 8)])
    with torch.no_grad():
        for k, g in enumerate(guard.groups):
            g.alpha.copy_(torch.tensor([2.3 + 0.1 * k, 2.1 + 0.2 * k]))
    cost = lambda: float(gmacs_loss(gm).detach())  # noqa: E731
    target = cost()
    in_sizes = lambda: [tuple(r["in_size"]) for r in alphas(gm)]  # noqa: E731  (one row per group here)
    seen: list[list[tuple[int, int]]] = []

    def score() -> float:  # prefers the largest first-stage width among the candidates it is shown
        sizes = [tuple(r["out_size"]) for r in alphas(gm)]
        seen.append(sizes)
        return -sizes[0][1] - 0.01 * sizes[0][0]

    sizes = land(guard, in_sizes, [0, 1, 2], cost, target, score)
    assert [tuple(r["out_size"]) for r in alphas(gm)] == sizes  # the alphas give exactly those sizes
    assert abs(cost() / target - 1) <= 0.03
    assert len(seen) > 1 and sizes in seen
    assert sizes[0][1] == max(s[0][1] for s in seen)
    # Without a budget it keeps the nearest rounding of what was learned.
    with torch.no_grad():
        guard.groups[0].alpha.copy_(torch.tensor([2.2, 3.3]))
    nearest = land(guard, in_sizes, [0, 1, 2], cost, None)
    assert nearest[0] == (round(32 / 2.2), round(32 / 3.3))


def test_scale_bounds_hold_on_both_axes_of_every_group():
    bundle, gm, train, _ = _setup("barcodes")
    # A large lambda drives every scale down; the lower bound stops it.
    fit(gm, train, None, epochs=1, lam=50.0 / float(gmacs_loss(gm).detach()), lr=0.05, alpha_lr=0.5,
        max_steps=6, input_size=bundle.input_size, progress=False, min_scale=0.4, max_scale=0.6,
        warmup=0.0, search_end=1.0, max_alpha_step=1.0)  # fmt: skip
    scales = [s for _, p in gm.named_modules() if hasattr(p, "scale") and hasattr(p, "alpha") for s in p.scale]
    assert scales and all(0.4 - 1e-6 <= s <= 0.6 + 1e-6 for s in scales)
    with pytest.raises(OptionError, match="larger than max_scale"):
        ScaleGuard.for_model(gm, lambda: [], min_scale=0.8, max_scale=0.5)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(OptionError, match="min_scale"):
            ScaleGuard.for_model(gm, lambda: [], min_scale=bad)


def test_default_bounds_follow_the_model():
    _, gm, _, _ = _setup("barcodes")
    guard = ScaleGuard.for_model(gm, lambda: [(32, 30), (16, 15), (8, 7)])
    assert [lo.tolist() for lo in guard.low] == [[1.0, 1.0]] * 3  # no upsampling by default
    assert [hi.tolist() for hi in guard.high] == [[32.0, 30.0], [16.0, 15.0], [8.0, 7.0]]  # >= 1 cell
    # A layer that starts upsampling may stay there; max_scale lets every layer upsample.
    guard.groups[1].set_scale((1.5, 0.5))
    moved = ScaleGuard.for_model(gm, lambda: [(32, 30), (16, 15), (8, 7)])
    assert moved.low[1].tolist() == pytest.approx([1 / 1.5, 1.0])
    assert ScaleGuard.for_model(gm, lambda: [], max_scale=2.0, min_scale=0.1).low[0].tolist() == [0.5, 0.5]


def test_one_step_moves_an_alpha_at_most_the_trust_region():
    _, gm, _, _ = _setup("barcodes")
    guard = ScaleGuard.for_model(gm, lambda: [(32, 32), (16, 16), (8, 8)], max_step=0.02)
    before = guard.snapshot()
    with torch.no_grad():
        guard.groups[0].alpha.copy_(torch.tensor([1e6, 1e-6]))  # what a huge lambda or lr would do
        guard.groups[1].alpha.copy_(torch.tensor([float("nan"), float("inf")]))
    guard.step(before)
    factor = math.exp(0.02)
    assert guard.groups[0].alpha.tolist() == pytest.approx([2.0 * factor, 2.0 / factor])
    assert guard.groups[1].alpha.tolist() == [2.0, 2.0]  # non-finite values undone
    assert guard.groups[2].alpha.tolist() == [2.0, 2.0]


def test_alpha_stepper_is_normalised_and_moves_along_the_budget():
    _, gm, _, _ = _setup("barcodes")
    groups = ScaleGuard.for_model(gm, lambda: [(32, 32), (16, 16), (8, 8)]).groups
    for scale in (1.0, 1e6):  # the step does not depend on the loss's scale
        with torch.no_grad():
            for g in groups:
                g.alpha.copy_(torch.tensor([2.0, 2.0]))
        stepper = AlphaStepper(groups)
        for g, grad in zip(groups, ([1.0, -1.0], [0.5, 0.0], [0.0, 0.0]), strict=True):
            g.alpha.grad = scale * torch.tensor(grad)
        stepper.step(0.01)
        moved = [float(torch.log(g.alpha / 2.0).abs().max()) for g in groups]
        assert max(moved) == pytest.approx(0.01 * math.sqrt(6 / 2.25), rel=1e-3)  # lr / rms of the log-gradient
        assert groups[0].alpha[0] < 2.0 < groups[0].alpha[1]
    # Along a cost direction equal on every axis, the common part of the gradient is removed.
    with torch.no_grad():
        for g in groups:
            g.alpha.copy_(torch.tensor([2.0, 2.0]))
    stepper = AlphaStepper(groups)
    for g in groups:
        g.alpha.grad = torch.tensor([1.0, 1.0])
    stepper.step(0.01, [torch.tensor([-1.0, -1.0])] * 3)
    assert all(g.alpha.tolist() == [2.0, 2.0] for g in groups)


def test_an_unreachable_budget_is_refused_before_any_step():
    bundle, gm, train, _ = _setup("digits-stretch")
    guard = ScaleGuard.for_model(gm, lambda: [(32, 32), (16, 16), (8, 8)])
    cheapest, largest = budget_range(guard, lambda: float(gmacs_loss(gm).detach()))
    # The cheapest: every map at its 2-cell floor; the first conv still runs at full resolution.
    assert cheapest < _real(gm, bundle.input_size) <= largest
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    for target in (0.5 * cheapest, 2.0 * largest):
        with pytest.raises(BudgetError, match="out of reach") as err:
            fit(gm, train, None, epochs=1, lr=0.05, max_steps=2, input_size=bundle.input_size, progress=False,
                target_gmacs=target)  # fmt: skip
        assert f"{cheapest:.4g}" in str(err.value) and f"{largest:.4g}" in str(err.value)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in weights.items())


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": float("nan")},
        {"alpha_lr": float("nan")},
        {"lam": float("inf")},
        {"lam": -1.0},
        {"weight_decay": float("-inf")},
        {"momentum": 1.5},
        {"target_gmacs": float("nan")},
        {"target_gmacs": -0.001},
        {"target_gmacs": 0.0},
        {"warmup": 0.7, "search_end": 0.5},
        {"search_end": 1.5},
        {"max_alpha_step": float("nan")},
        {"floor_gradient": "never"},
        {"position_gradient": "centre"},
        {"epochs": 0},
    ],
)
def test_nan_inf_and_out_of_range_hyperparameters_are_refused_up_front(bad):
    bundle, gm, train, _ = _setup("barcodes")
    alpha = [p.detach().clone() for n, p in gm.named_parameters() if n.endswith("alpha")]
    kwargs = {"epochs": 1, "lr": 0.05, "max_steps": 1, "input_size": bundle.input_size, "progress": False}
    with pytest.raises(OptionError):
        fit(gm, train, None, **{**kwargs, **bad})
    assert all(
        torch.equal(a, p)
        for a, p in zip(alpha, [p for n, p in gm.named_parameters() if n.endswith("alpha")], strict=True)
    )


def test_the_graph_records_and_counts_with_an_axis_at_the_floor():
    # Recorded for the first time while one group's height sits below the floor (its size no longer moves).
    _, gm, _, _ = _setup("barcodes")
    groups = ScaleGuard.for_model(gm, lambda: [(32, 32), (16, 16), (8, 8)]).groups
    with torch.no_grad():
        groups[1].alpha.copy_(torch.tensor([20.0, 2.0]))
    assert stage_sizes(gm) == [(32, 32), (16, 16), (2, 8), (2, 4)]
    assert float(gmacs_loss(gm)) == pytest.approx(count_gmacs(gm, (32, 32)).total, rel=1e-9)
    # The squeezed axis still gets a gradient from the cost (it can grow back).
    loss = gmacs_loss(gm)
    (grad,) = torch.autograd.grad(loss, groups[1].alpha)
    assert bool((grad != 0).all())


def test_a_squeezed_axis_grows_back_when_the_task_asks():
    # Below the floor the literal max(., 1.5) gives no gradient; the default lets it through.
    _, gm, train, _ = _setup("barcodes")
    groups = ScaleGuard.for_model(gm, lambda: [(32, 32), (16, 16), (8, 8)]).groups
    images, labels = next(iter(train))
    for mode, expect_zero in (("stop", True), ("pass", False)):
        for _, m in gm.named_modules():
            if hasattr(m, "set_floor_gradient"):
                m.set_floor_gradient(mode)
        with torch.no_grad():
            groups[1].alpha.copy_(torch.tensor([20.0, 2.0]))  # height at 0.8 cells: at the floor
        gm.zero_grad()
        torch.nn.functional.cross_entropy(gm(images), labels).backward()
        assert (float(groups[1].alpha.grad[0]) == 0.0) is expect_zero


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
    assert "target 0.002 GMACs (real cost, projected every step)" in result.stdout
    assert "final GMACs" in result.stdout and "train_acc" in result.stdout and "val_acc" in result.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [len(r["lambda_steps"]) for r in log] == [6, 6]
    assert [p["out"] for p in log[0]["initial_pools"]] == [[16, 16], [8, 8], [4, 4]]
    assert all(s <= 0.6 + 1e-6 for p in log[-1]["pools"] for s in p["scale"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"

    help_text = runner.invoke(app, ["train", "--help"], env=env).stdout
    assert "--target-gmacs" in help_text and "2.2e-4" in help_text

    bad = runner.invoke(app, ["train", "vgg-tiny", "--data", "barcodes", "--target-gmacs", "-1"], env=env)
    assert bad.exit_code == 2 and "--target-gmacs must be a finite number > 0, got -1.0" in bad.output
    bad = runner.invoke(app, ["train", "vgg-tiny", "--data", "barcodes", "--min-scale", "0.8", "--max-scale", "0.5"])
    assert bad.exit_code == 2 and "larger than --max-scale" in bad.output
    no_weights = runner.invoke(
        app, ["train", "vgg-tiny", "--data", "barcodes", "--pretrained", "--out", str(tmp_path / "x")]
    )
    assert no_weights.exit_code != 0 and "no pretrained weights for dynoswap:vgg-tiny" in no_weights.output
    assert "Traceback" not in no_weights.output


def test_an_input_too_small_for_any_scale_is_an_option_error():
    import torchvision

    gm, _ = convert(torchvision.models.resnet18(num_classes=10), (1, 1))
    with pytest.raises(OptionError, match="too small to relate sizes to scales: DynOPool 'conv1_dynopool'"):
        gmacs_loss(gm)


# -- budget annealing: from the model's own cost to the target --------------------------------
def test_annealed_budget_moves_log_linearly_from_the_models_own_cost_to_the_target():
    bundle, gm, train, val = _setup("barcodes")
    start = float(gmacs_loss(gm).detach())
    target = 0.5 * start
    steps = []
    records = fit(
        gm, train, None, epochs=5, lr=0.05, alpha_lr=0.05, max_steps=8, input_size=bundle.input_size,
        progress=False, target_gmacs=target, budget_anneal=0.5, search_end=0.6, warmup=0.0,
        on_step=lambda step, m: steps.append((step, m["gmacs"])),
    )  # fmt: skip
    total, anneal = 40, 20
    # Each record's budget is the schedule's value after its last step: start**(1-t) * target**t.
    for r in records:
        t = min(r["step"] / anneal, 1.0)
        assert r["budget"] == pytest.approx(start ** (1 - t) * target**t, rel=1e-9)
        assert abs(r["gmacs"] / r["budget"] - 1) <= 0.10, (r["step"], r["gmacs"], r["budget"])
    assert [r["budget"] for r in records][:2] == sorted([r["budget"] for r in records][:2], reverse=True)
    # The real cost falls with the budget: early steps cost well above the target, then on it.
    early = [g for s, g in steps if s <= 4]
    assert min(early) > 1.5 * target
    assert all(abs(g / target - 1) <= 0.10 for s, g in steps if s > anneal)
    assert abs(_real(gm, bundle.input_size) / target - 1) <= 0.03
    assert records[-1]["step"] == total


def test_no_annealing_holds_the_target_from_the_first_step():
    bundle, gm, train, _ = _setup("barcodes")
    target = 0.5 * float(gmacs_loss(gm).detach())
    steps = []
    records = fit(
        gm, train, None, epochs=2, lr=0.05, alpha_lr=0.05, max_steps=6, input_size=bundle.input_size,
        progress=False, target_gmacs=target, budget_anneal=0.0,
        on_step=lambda step, m: steps.append(m["gmacs"]),
    )  # fmt: skip
    assert all(r["budget"] == target for r in records)
    assert all(abs(g / target - 1) <= 0.10 for g in steps), steps


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, 1.5, "0.3"])
def test_bad_budget_anneal_is_refused_before_any_work(value):
    bundle, gm, train, _ = _setup("barcodes")
    before = [p.detach().clone() for p in gm.parameters()]
    with pytest.raises(OptionError, match="budget_anneal"):
        fit(gm, train, epochs=1, max_steps=2, input_size=bundle.input_size, progress=False,
            target_gmacs=0.002, budget_anneal=value)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(before, gm.parameters(), strict=True))


def test_resume_inside_the_annealing_matches_an_uninterrupted_run(tmp_path):
    kwargs = dict(
        epochs=4, lr=0.05, alpha_lr=0.05, max_steps=6, progress=False, budget_anneal=0.5, warmup=0.0
    )  # fmt: skip

    def run(out, stop=False, resume=False):
        bundle, gm, _, _ = _setup("barcodes")
        train = torch.utils.data.DataLoader(bundle.train, batch_size=64)  # one order every epoch
        target = 0.5 * float(gmacs_loss(gm).detach())

        def halt(record):
            if stop and record["epoch"] == 1:
                raise KeyboardInterrupt

        if resume:
            torch.manual_seed(999)  # every state comes from the checkpoint
        records = fit(gm, train, out=out, resume=resume, target_gmacs=target, input_size=bundle.input_size,
                      on_epoch_end=halt, **kwargs)  # fmt: skip
        return gm, records

    reference, ref_records = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", stop=True)
    resumed, records = run(tmp_path / "run", resume=True)
    assert [r["budget"] for r in records] == [r["budget"] for r in ref_records[1:]]
    assert [r["budget"] for r in ref_records][0] > [r["budget"] for r in ref_records][-1]
    assert [g.alpha.tolist() for g in leaders(reference)] == [g.alpha.tolist() for g in leaders(resumed)]
