"""The sweep's pinned table: it covers every swept model, the page and the README are generated from or
checked against it, and the check fails on a regression (the sweep itself is slow: ``make sweep``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.sweep_table import PAGE, TORCHVISION, check_pinned, load_table, pinned, planned, render_page, summary

README = Path(__file__).parents[1] / "README.md"
#: The README words one category for its sentence.
SMALL_INPUT = {"fail at the sweep's small input": "fails at the input size"}


def test_every_swept_model_has_one_pinned_outcome_in_page_order():
    table = load_table()
    assert [(e["library"], e["model"]) for e in table["models"]] == planned()
    assert table["planned"] == len(planned())


def test_the_compatibility_page_is_rendered_from_the_pinned_table():
    assert PAGE.read_text() == render_page(load_table()), "run: python -m tests.sweep_table"


def _converted(**changes: object) -> dict:
    entry = pinned()[TORCHVISION, "resnet18"]
    result = {k: entry[k] for k in ("status", "dynopools", "alphas", "resized", "limits", "checked", "size")}
    return {**result, "reason": "", **changes}


def test_the_pinned_outcome_passes():
    assert pinned()[TORCHVISION, "resnet18"]["status"] == "converted"
    check_pinned(TORCHVISION, "resnet18", _converted())


@pytest.mark.parametrize(
    "regression",
    [
        {"status": "refused", "category": "breaks when scales move", "reason": "x"},  # a listed category
        {"status": "refused", "category": "untraceable", "reason": "x"},
        {"status": "refused", "category": "fails at the input size", "reason": "x"},
        {"dynopools": 6},  # a resizer no longer replaced
        {"alphas": 3},  # groups tied that were not
        {"checked": False},
        {"status": "crash", "reason": "AttributeError: x"},
    ],
)
def test_a_regression_fails_the_pinned_check(regression):
    with pytest.raises(AssertionError):
        check_pinned(TORCHVISION, "resnet18", _converted(**regression))


def test_a_refusal_in_another_category_fails_and_an_unpinned_model_fails():
    entry = pinned()[TORCHVISION, "vit_b_16"]
    assert entry["status"] == "refused" and entry["category"] == "fixed input size"
    check_pinned(TORCHVISION, "vit_b_16", {"status": "refused", "category": "fixed input size", "reason": "x"})
    with pytest.raises(AssertionError):
        check_pinned(TORCHVISION, "vit_b_16", {"status": "refused", "category": "untieable merge", "reason": "x"})
    with pytest.raises(AssertionError, match="no pinned outcome"):
        check_pinned(TORCHVISION, "resnet_new", {"status": "converted"})


def test_the_readme_sweep_figures_are_the_pinned_tables():
    text = " ".join(README.read_text().split())
    table = load_table()
    s = summary(table)
    counts = s["counts"]
    refused = sum(v for k, v in counts.items() if k.startswith("refused: "))
    assert f"{s['models']} models, {table['seconds']:.0f} s on one thread" in text
    assert f"{counts['converted']} convert and pass every check" in text
    assert f"{refused} are refused in a named category" in text
    by_category = re.search(r"are refused in a named category \(([^)]*)\)", text)
    assert by_category is not None
    stated = {name.strip(): int(n) for n, name in re.findall(r"(\d+) ([^,]+)", by_category.group(1))}
    stated = {SMALL_INPUT.get(name, name): n for name, n in stated.items()}
    assert stated == {k.removeprefix("refused: "): v for k, v in counts.items() if k.startswith("refused: ")}
    assert f"{counts.get('timeout', 0)} timeout" in text
    assert (
        f"of the {s['timm_cnn']} without a fixed input size, position embedding or window partition, "
        f"{s['timm_cnn_converted']} convert ({s['timm_cnn_percent']:.1f}%" in text
    )
    assert f"({s['timm_swept']} families with a 2-D conv or pool)" in text
