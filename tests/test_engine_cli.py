"""The engine's CLI options: --leaf-module, --head; inspect of a model dynoswap cannot convert."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dynoswap.cli import app

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env=ENV)


def test_leaf_module_keeps_its_resizers_and_head_is_validated() -> None:
    result = invoke("convert", "resnet18", "--input-size", "64", "64", "--num-classes", "10", "--json")
    leafed = invoke(
        "convert", "resnet18", "--input-size", "64", "64", "--num-classes", "10", "--leaf-module", "layer2", "--json"
    )
    assert result.exit_code == 0 and leafed.exit_code == 0, leafed.output
    plain, kept = json.loads(result.stdout), json.loads(leafed.stdout)
    assert any(r["name"].startswith("layer2.") for r in plain["replacements"])
    assert not any(r["name"].startswith("layer2.") for r in kept["replacements"])
    assert any(s["name"] == "layer2" and "leaf" in s["reason"] for s in kept["skipped"])
    bad = invoke("convert", "resnet18", "--input-size", "64", "64", "--head", "grow")
    assert bad.exit_code == 2 and "--head must be none or adapt" in bad.output  # bad usage


def test_inspect_shows_a_vit_without_converting_it() -> None:
    result = invoke("inspect", "vit_b_16", "--input-size", "224", "224", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["stages"] == [[224, 224], [14, 14]] and data["params"] == 86_567_656 and data["dynopools"] == []
