"""`make experiment`: equal cost under one convention, the human model's exact max pooling, honest verdicts."""

from __future__ import annotations

import argparse

import pytest

from dynoswap import experiment
from dynoswap.cost import count_gmacs


def test_human_input_sizes_keep_every_pooling_on_even_sizes():
    assert [experiment.human_size((32, 32), f) for f in (0.5, 0.75, 1.0)] == [(16, 16), (24, 24), (32, 32)]
    assert experiment.human_size((64, 48), 0.6) == (40, 32)
    assert experiment.human_size((8, 8), 0.25) == (8, 8)  # never below 8: three 2x2 poolings still fit


@pytest.mark.parametrize("design", ["human", "symmetric"])
def test_each_design_is_costed_as_the_model_it_runs_at_the_human_models_budget(design):
    args = argparse.Namespace(epochs=1, batch_size=64, lr=0.05, alpha_lr=0.02, seeds=[0], budget_anneal=0.3)
    row = experiment.run_point("barcodes-noisy", design, 0.5, 0, args)
    _, human = experiment._convert((16, 16), 10, 0)
    assert row["target_gmacs"] == pytest.approx(count_gmacs(human, (16, 16)).total)
    assert row["input_size"] == ([16, 16] if design == "human" else [32, 32])
    if design == "human":
        assert row["gmacs"] == pytest.approx(row["target_gmacs"])  # the budget is its own cost
        assert row["stage_sizes"] == [[16, 16], [8, 8], [4, 4], [2, 2]]
    else:
        assert abs(row["gmacs"] / row["target_gmacs"] - 1) <= 0.03
        sizes = row["stage_sizes"][1:]
        assert all(abs(h - w) <= 1 for h, w in sizes), sizes  # symmetric up to the landing's rounding


def _row(design, factor, acc, seed):
    return {
        "dataset": "d",
        "design": design,
        "factor": factor,
        "seed": seed,
        "val_acc": acc,
        "gmacs": 1.0,
        "target_gmacs": 1.0,
        "input_size": [32, 32],
        "stage_sizes": [[32, 32], [2, 2]],
        "seconds": 1.0,
    }


def test_summary_and_verdicts_are_mean_std_over_seeds_against_the_combined_noise():
    rows = [_row("human", 0.5, a, s) for s, a in enumerate((0.6, 0.62, 0.64))]
    rows += [_row("symmetric", 0.5, a, s) for s, a in enumerate((0.70, 0.74, 0.78))]
    rows += [_row("dynopool", 0.5, a, s) for s, a in enumerate((0.71, 0.75, 0.79))]
    summary = experiment.summarize(rows)
    by_design = {r["design"]: r for r in summary}
    assert by_design["human"]["val_acc"] == pytest.approx(0.62)
    assert by_design["human"]["val_acc_std"] == pytest.approx(0.02)
    (line,) = experiment.verdicts(summary)
    assert "+13.0 points vs human (ahead, combined std 4.5)" in line
    assert "+1.0 points vs symmetric (within noise, combined std 5.7)" in line
