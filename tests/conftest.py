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
    parser.addoption("--regen-golden", action="store_true", default=False, help="rewrite the CLI golden files")
