"""``dynoswap convert MODEL --submodule PATH`` and inspect of a model with one converted part."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from dynoswap.cli import app

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
runner = CliRunner()
DETECTOR = (
    "tv:fasterrcnn_mobilenet_v3_large_fpn",
    "--num-classes",
    "3",
    "--model-kwargs",
    "min_size=128",
    "--model-kwargs",
    "max_size=128",
    "--input-size",
    "128",
    "128",
)


def invoke(*args: str):
    return runner.invoke(app, list(args), env=ENV)


def test_convert_a_part_saves_the_whole_model_and_inspect_shows_the_part(tmp_path) -> None:
    out = tmp_path / "detector"
    result = invoke("convert", *DETECTOR, "--submodule", "backbone", "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["submodule"] == "backbone" and data["before"]["submodule"] == "backbone"
    assert data["input_size"] == [128, 128]
    assert len(data["replacements"]) == len(data["dynopools"]) == 6
    assert (
        data["stages"] == data["before"]["stages"] == [[128, 128], [64, 64], [32, 32], [16, 16], [8, 8], [4, 4], [2, 2]]
    )
    recipe = json.loads((out / "recipe.json").read_text())["recipe"]
    assert recipe["options"]["submodule"] == "backbone" and recipe["options"]["anchors"] == "float"
    assert recipe["source"]["name"] == "fasterrcnn_mobilenet_v3_large_fpn"
    shown = invoke("inspect", str(out), "--json")
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.stdout)
    assert facts["submodule"] == "backbone" and facts["input_size"] == [128, 128]
    assert facts["gmacs"] == data["gmacs"] and len(facts["dynopools"]) == 6
    table = invoke("inspect", str(out))
    assert table.exit_code == 0 and "converted part   backbone" in table.stdout


def test_the_table_names_the_part() -> None:
    result = invoke("convert", *DETECTOR, "--submodule", "backbone")
    assert result.exit_code == 0, result.output
    assert (
        "torchvision:fasterrcnn_mobilenet_v3_large_fpn backbone (128x128 input): 6 DynOPool, 6 alpha" in result.stdout
    )


def test_a_detector_that_does_not_trace_is_pointed_at_its_backbone() -> None:
    result = invoke("convert", *DETECTOR)
    assert result.exit_code == 1
    message = " ".join(result.output.split())
    assert "dynoswap cannot trace FasterRCNN as a whole" in message
    assert "`dynoswap convert MODEL --submodule backbone`" in message
    assert "Parts with pools or strided convs, largest first: backbone" in message


def test_a_missing_or_malformed_part_is_bad_usage() -> None:
    missing = invoke("convert", *DETECTOR, "--submodule", "neck")
    assert missing.exit_code == 2
    assert (
        "submodule 'neck' does not exist: FasterRCNN has no child 'neck'; parts with pools or strided convs: backbone"
        in (" ".join(missing.output.split()))
    )
    malformed = invoke("convert", *DETECTOR, "--submodule", "backbone;rm")
    assert malformed.exit_code == 2 and "must be a dotted submodule path" in malformed.output
