"""Shared fixtures: keep this small; add a fixture only when several test files need it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def seeded() -> None:
    """Seed torch's global generator so random inputs are reproducible."""
    torch.manual_seed(0)


def pytest_addoption(parser: pytest.Parser) -> None:
    """Add ``--regen-golden``: rewrite tests/golden/* from the current CLI output."""
    parser.addoption(
        "--regen-golden",
        action="store_true",
        default=False,
        help="rewrite the CLI golden files, print the diff and fail the run",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where no CUDA device exists (CI has none; lent GPU machines do)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
