"""One error policy: typed exceptions, one exit-code table that the README states, API misuse caught early."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from typer.testing import CliRunner

import dynoswap
from dynoswap import errors
from dynoswap.cli import app
from dynoswap.cli.common import EXIT_FAILURE, EXIT_INTERNAL, exit_code_of, hint_of, internal_error_line
from dynoswap.layers import sizing
from dynoswap.models import ModelSource
from dynoswap.presets import ConvertOptions, TrainOptions, parse_preset
from dynoswap.validate import MIN_OUTPUT_SIDE, check_convert_args, check_scale, check_size, check_target_sizes

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
README = Path(__file__).parents[1] / "README.md"
TINY = ["vgg-tiny", "--input-size", "32", "32", "--num-classes", "10", "--model-kwargs", "widths=[8, 16]"]
runner = CliRunner()

# Every class of dynoswap.errors, and the engine's two ConversionError subclasses.
ERROR_CLASSES = [
    cls for _, cls in inspect.getmembers(errors, inspect.isclass) if issubclass(cls, errors.DynoswapError)
] + [dynoswap.TraceError, dynoswap.engine.TieError]


def readme_table() -> dict[str, tuple[int, str]]:
    """Error type (or ``any other exception``) -> (exit code, example line) as the README states them."""
    rows = re.findall(r"^\| `?([\w ]+?)`? \| (\d+) \| `(error: .+)` \|$", README.read_text(), flags=re.MULTILINE)
    return {name: (int(code), example) for name, code, example in rows}


def test_the_readme_table_lists_every_error_class_with_its_exit_code():
    table = readme_table()
    assert set(table) == {cls.__name__ for cls in ERROR_CLASSES} | {"OSError", "any other exception"}
    for cls in ERROR_CLASSES:
        assert exit_code_of(cls("x")) == table[cls.__name__][0], cls.__name__
    assert exit_code_of(OSError(28, "No space left on device")) == table["OSError"][0] == EXIT_FAILURE


def test_the_readme_states_the_internal_error_code_and_line():
    code, example = readme_table()["any other exception"]
    assert code == EXIT_INTERNAL
    exc = AttributeError("...")
    assert exit_code_of(exc) == EXIT_INTERNAL
    assert example == f"error: {internal_error_line(exc)}"


def test_bad_input_exits_2_and_failures_exit_1():
    assert {cls.__name__ for cls in ERROR_CLASSES if exit_code_of(cls("x")) == 2} == {
        "ModelError",
        "UntrustedCodeError",
        "RecipeError",
        "PresetError",
        "DataError",
        "OptionError",
        "BudgetError",
        "LatencyTableError",
        "OutputExistsError",
        "OutputLockedError",
        "RunExistsError",
        "FrozenSizeError",
    }
    assert exit_code_of(errors.DynoswapError("x")) == 1


def test_hints_name_the_flag_only_in_the_cli():
    assert hint_of(errors.OutputExistsError("x", replaceable=True)) == "pass --force to replace it"
    assert hint_of(errors.OutputExistsError("x")) == "choose another path"
    assert hint_of(errors.OutputLockedError("x")) == ""
    assert "--trust-code" in hint_of(errors.UntrustedCodeError("x"))
    assert hint_of(errors.UntrustedCodeError("x", trustable=False)) == ""  # downloads are never allowed


def test_min_output_side_follows_the_size_rule():
    assert MIN_OUTPUT_SIDE == int(sizing.MIN_SIZE + 0.5)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("resnet18", (64, 64)), TypeError, "convert needs a torch.nn.Module, got str 'resnet18'"),
        ((nn.Conv2d(3, 3, 3), (64.5, 64)), TypeError, "input_size must be 1 to 3 integers"),
        ((nn.Conv2d(3, 3, 3), (True, True)), TypeError, "input_size must be 1 to 3 integers"),
        ((nn.Conv2d(3, 3, 3), (64, 64, 64, 64)), ValueError, "got 4 values"),
        ((nn.Conv2d(3, 3, 3), (64,)), ValueError, "Conv2d at the model is 2-D but input_size has 1 side"),
        ((nn.Conv2d(3, 3, 3), (0, 64)), ValueError, "at least 1 on each side"),
        ((nn.Conv2d(3, 3, 3), "64x64"), TypeError, "input_size must be 1 to 3 integers"),
    ],
)
def test_convert_misuse_is_a_clear_type_or_value_error(args, error, message):
    with pytest.raises(error, match=re.escape(message)):
        dynoswap.convert(*args)


def test_converting_a_converted_model_is_refused():
    source = ModelSource("dynoswap", "vgg-tiny", {"widths": [8, 16]})
    gm, _ = dynoswap.convert(source.build(), (32, 32), source=source)
    with pytest.raises(ValueError, match="already converted"):
        dynoswap.convert(gm, (32, 32))
    assert check_convert_args(source.build(), (32, 30)) == (32, 30)


def test_sizes_and_scales():
    assert check_target_sizes([(2, 3), [40, 40]]) == [(2, 3), (40, 40)]
    with pytest.raises(ValueError, match="cannot be hit exactly"):
        check_target_sizes([(1, 4)])
    with pytest.raises(TypeError):
        check_target_sizes("8x8")
    assert check_size(torch.Size([3, 4]), "x") == (3, 4)
    assert check_scale(0.5, "r") == (0.5, 0.5)
    for bad in (float("nan"), float("inf"), 0, -1, (0.5, float("nan")), 8.5, 1e30):
        with pytest.raises(ValueError, match="finite, > 0 and at most 8"):
            check_scale(bad, "r")
    with pytest.raises(TypeError):
        check_scale(True, "r")


def test_sizes_larger_than_the_input_are_reported_as_upsampling():
    result = runner.invoke(app, ["convert", *TINY, "--sizes", "40x36"], env=ENV)
    assert result.exit_code == 0, result.output
    assert "note: 3_dynopool upsamples 32x32 -> 40x36 (its target is larger than its input)" in result.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["inspect", *TINY, "--weights", "{tmp}"], 2, "is a folder, not a file"),
        (["inspect", *TINY, "--weights", "{tmp}/nope.pth"], 2, "--weights {tmp}/nope.pth: no such file"),
        (["convert", *TINY, "--config", "{tmp}/bad.yaml"], 2, "'input_size' must be two positive integers"),
        (["convert", *TINY, "--config", "{tmp}"], 2, "is a folder, not a YAML file"),
        (["convert", "tests.no_such_module:factory"], 2, "refused to import module 'tests.no_such_module'"),
    ],
)
def test_cli_messages_say_what_was_wrong(tmp_path, args, code, message):
    (tmp_path / "bad.yaml").write_text("convert:\n  input_size: [0, -1]\n")
    result = runner.invoke(app, [a.format(tmp=tmp_path) for a in args], env=ENV)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.exit_code == code and len(lines) == 1 and message.format(tmp=tmp_path) in lines[0], result.stderr


PRESET_KEYS = sorted(
    {"name", "backbone", "dataset", "variant", "convert", "train", "surprise"}
    | set(ConvertOptions.__dataclass_fields__)
    | set(TrainOptions.__dataclass_fields__)
)
PRESET_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([-1, 0, 2, 10**12, float("nan"), float("inf"), 0.5, "sgd", "post", "pkg.mod:f", "resnet18"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(PRESET_KEYS), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None)
@given(data=st.dictionaries(st.sampled_from(PRESET_KEYS), PRESET_VALUES, max_size=4))
def test_any_preset_mapping_parses_or_fails_with_one_preset_error(data):
    try:
        preset = parse_preset(data, "fuzz.yaml")
    except (errors.PresetError, errors.UntrustedCodeError) as exc:
        assert str(exc).startswith("fuzz.yaml") and "\n" not in str(exc)
    else:
        assert 1 <= min(preset.convert.input_size) and max(preset.convert.input_size) <= 16384
        assert preset.convert.init_scale is None or preset.convert.init_scale > 0
