"""The typed recipe: round trips, one clear line per bad field, and property tests over mutated recipes.

Every mutation of a valid saved folder (dropped, retyped or duplicated fields, huge or
negative sizes, unknown versions, NaN alphas) must give either a successful load or one
dynoswap-typed error; the CLI must answer with that error's one ``error:`` line and its exact exit code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.cli.common import exit_code_of, one_line
from dynoswap.errors import CheckpointError, DynoswapError, RecipeError
from dynoswap.io.recipe import FORMAT, RECIPE_FILE, Recipe, recipe_of
from dynoswap.models import ModelSource
from dynoswap.validate import MAX_SCALE

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
SOURCE = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10, "widths": [8, 16, 16]})
runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    gm, _ = dynoswap.convert(SOURCE.build(), (32, 28), source=SOURCE, overrides={"3": (0.6, 0.4)})
    return dynoswap.save(gm, tmp_path_factory.mktemp("recipe") / "m")


def document_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / RECIPE_FILE).read_text())


def write_copy(saved: Path, dest: Path, text: str, weights: bytes | None = None) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / RECIPE_FILE).write_text(text)
    (dest / "model.safetensors").write_bytes(
        weights if weights is not None else (saved / "model.safetensors").read_bytes()
    )
    return dest


def test_recipe_round_trips_through_the_dict_and_the_document(saved):
    gm = dynoswap.load(saved)
    recipe = recipe_of(gm)
    assert recipe.to_dict() == gm.meta["dynoswap"]  # the engine's dict is exactly the typed recipe
    assert recipe.source == SOURCE and recipe.input_size == (32, 28)
    assert recipe.options.overrides == {"3": (0.6, 0.4)}
    again = Recipe.from_json(Recipe.read(saved).to_json())
    assert again == Recipe.read(saved)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("format_version"), "field 'format_version' is missing"),
        (lambda d: d.update(format_version=99), "format version 99 is unknown (this dynoswap reads 1-2); upgrade"),
        (lambda d: d.update(format_version="1"), "field 'format_version' must be an integer, got str"),
        (lambda d: d["recipe"].pop("source"), "field 'recipe.source' is missing"),
        (lambda d: d["recipe"].pop("options"), "field 'recipe.options' is missing"),
        (lambda d: d["recipe"].update(source=[]), "field 'recipe.source' must be a mapping, got list"),
        (lambda d: d["recipe"]["source"].pop("name"), "field 'recipe.source.name' is missing"),
        (lambda d: d["recipe"].update(input_size=[0, -1]), "field 'recipe.input_size[0]' must be between 1 and"),
        (lambda d: d["recipe"].update(input_size=[32.5, 32]), "field 'recipe.input_size[0]' must be an integer"),
        (lambda d: d["recipe"].update(input_size=[True, 32]), "field 'recipe.input_size[0]' must be an integer"),
        (lambda d: d["recipe"]["options"].update(sizes=[[1, 1], [4, 4], [2, 2]]), "'recipe.options.sizes[0][0]'"),
        (lambda d: d["recipe"]["options"].update(placement="middle"), "must be one of post, pre"),
        (lambda d: d["recipe"]["options"].update(init_scale=[math.nan, 1]), "must be finite and > 0"),
        (lambda d: d["recipe"]["options"].update(surprise=1), "'recipe.options.surprise' is not a known option"),
        (lambda d: d["recipe"]["options"].update(leaf_modules="x"), "'recipe.options.leaf_modules' must be a list"),
        (lambda d: d["recipe"].update(input_size=[4, 32, 32, 32]), "'recipe.input_size' must have 1 to 3 values"),
        (
            lambda d: d["recipe"].update(input_size=[]),
            "'recipe.input_size' must have 1 to 3 values ([L], [H, W] or [T, H, W]), got 0",
        ),
        # a 3-D size with the 2-D options of the saved model: each option must have one value per axis
        (lambda d: d["recipe"].update(input_size=[4, 32, 32]), "must have 3 values, got 2 values"),
        (
            lambda d: d["recipe"].update(input_size=[32, 32, 32]) or d["recipe"]["options"].update(overrides={}),
            "cannot be replayed: Conv2d at 0 is 2-D but input_size has 3 sides",
        ),
    ],
)
def test_each_bad_field_is_one_line_naming_file_and_field(saved, tmp_path, edit, message):
    document = document_of(saved)
    edit(document)
    folder = write_copy(saved, tmp_path / "bad", json.dumps(document))
    with pytest.raises(RecipeError) as info:
        dynoswap.load(folder)
    text = str(info.value)
    assert text.startswith(str(folder / RECIPE_FILE)) and message in text, text
    assert "\n" not in text
    result = runner.invoke(app, ["inspect", str(folder)], env=ENV)
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [f"error: {text}"]


def test_not_json_and_not_ours(saved, tmp_path):
    with pytest.raises(RecipeError, match="not valid JSON"):
        dynoswap.load(write_copy(saved, tmp_path / "a", "{nope"))
    with pytest.raises(RecipeError, match=f"not a dynoswap recipe \\(format 'x', expected '{FORMAT}'\\)"):
        dynoswap.load(write_copy(saved, tmp_path / "b", json.dumps({"format": "x"})))


def test_a_folder_without_weights_is_a_checkpoint_failure_like_other_weight_problems(saved, tmp_path):
    folder = write_copy(saved, tmp_path / "w", (saved / RECIPE_FILE).read_text())
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        dynoswap.load(folder)
    assert runner.invoke(app, ["inspect", str(folder)], env=ENV).exit_code == 1


@pytest.mark.parametrize("value", [math.nan, math.inf, -2.0, 0.0, 1e-30, 0.1])
def test_bad_alpha_is_refused_before_any_forward(saved, tmp_path, value):
    state = load_file(str(saved / "model.safetensors"))
    key = next(k for k in state if k.endswith("alpha"))
    state[key] = torch.tensor([value, 2.0])
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    folder = write_copy(saved, tmp_path / "m", (saved / RECIPE_FILE).read_text(), weights.read_bytes())
    with pytest.raises(CheckpointError, match=f"{key} is .* must be finite and at least 0.125 .*; the file is damaged"):
        dynoswap.load(folder)
    result = runner.invoke(app, ["inspect", str(folder)], env=ENV)
    assert result.exit_code == 1 and "tlparse" not in result.stderr and "Traceback" not in result.stderr


def test_non_finite_weights_warn_or_fail_with_strict_values(saved, tmp_path):
    state = load_file(str(saved / "model.safetensors"))
    key = next(k for k in state if k.endswith("weight") and state[k].dim() == 4)
    state[key][0, 0, 0, 0] = math.inf
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    folder = write_copy(saved, tmp_path / "m", (saved / RECIPE_FILE).read_text(), weights.read_bytes())
    with pytest.warns(UserWarning, match=f"1 weight tensor\\(s\\) hold NaN or infinity \\({key}\\)"):
        dynoswap.load(folder)
    with pytest.raises(CheckpointError, match="hold NaN or infinity"):
        dynoswap.load(folder, strict_values=True)
    warned = runner.invoke(app, ["inspect", str(folder), "--json"], env=ENV)
    assert warned.exit_code == 0 and "warning: " in warned.stderr and "NaN or infinity" in warned.stderr
    strict = runner.invoke(app, ["inspect", str(folder), "--strict-values"], env=ENV)
    assert strict.exit_code == 1 and "hold NaN or infinity" in strict.stderr


# -- property tests ----------------------------------------------------------------------------
EDGE_INTS = st.sampled_from([-(2**63), -1, 0, 1, 2, 3, 7, 10**7, 2**40])
EDGE_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -1.5, 0.0, 0.5, 1e300, 64.5])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | EDGE_INTS | EDGE_FLOATS | st.sampled_from(["", "post", "class:this:s", "os:system"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["a", "library", "name"]), inner, max_size=2)
    ),
    max_leaves=6,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*prefix, i))
    return out


def mutate(document: dict[str, Any], path: tuple, action: str, value: Any) -> str:
    """Apply one mutation at ``path`` and return the JSON text (duplicates are written as raw text)."""
    if not path:
        return json.dumps(value)
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "drop":
        del parent[last]
    elif action == "replace":
        parent[last] = value
    elif action == "duplicate" and isinstance(last, str):
        # JSON with the key twice: the reader sees the last one.
        text = json.dumps(document)
        marker = json.dumps(last) + ":"
        return text.replace(marker, f"{marker} {json.dumps(value)}, {marker}", 1)
    return json.dumps(document)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_recipes_load_or_fail_with_one_dynoswap_error(saved, tmp_path, data):
    document = document_of(saved)
    path = data.draw(st.sampled_from(paths(document)), label="path")
    action = data.draw(st.sampled_from(["drop", "replace", "duplicate"]), label="action")
    value = data.draw(JSON_VALUES, label="value")
    text = mutate(document, path, action, value)
    folder = write_copy(saved, tmp_path / "m", text)
    try:
        dynoswap.load(folder)
    except DynoswapError as exc:
        assert "\n" not in str(exc).strip(), str(exc)
    except Exception as exc:  # pragma: no cover - the property's failure
        pytest.fail(f"{type(exc).__name__} escaped for {path} {action} {value!r}: {exc}")


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_cli_never_shows_a_traceback_for_a_mutated_recipe(saved, tmp_path, data):
    document = document_of(saved)
    path = data.draw(st.sampled_from(paths(document)), label="path")
    value = data.draw(JSON_VALUES, label="value")
    folder = write_copy(saved, tmp_path / "m", mutate(document, path, "replace", value))
    # What the library says about the folder decides the exact exit code: 0, or the table's code of its error.
    try:
        dynoswap.load(folder)
    except DynoswapError as exc:
        expected, line = exit_code_of(exc), f"error: {one_line(exc)}"
    else:
        expected, line = 0, ""
    result = runner.invoke(app, ["inspect", str(folder), "--json"], env=ENV)
    assert "Traceback" not in result.stderr
    assert result.exit_code == expected, (path, value, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == (1 if expected else 0) and all(e.startswith(line) for e in errors), result.stderr


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(EDGE_FLOATS | st.floats(0.1, 10), min_size=2, max_size=2))
def test_saved_alphas_of_any_value_load_or_are_refused_cleanly(saved, tmp_path, values):
    state = load_file(str(saved / "model.safetensors"))
    key = next(k for k in state if k.endswith("alpha"))
    state[key] = torch.tensor(values, dtype=state[key].dtype)
    weights = tmp_path / "w.safetensors"
    save_file(state, str(weights))
    folder = write_copy(saved, tmp_path / "m", (saved / RECIPE_FILE).read_text(), weights.read_bytes())
    # As stored (1e300 is inf in float32); alphas below 1 / MAX_SCALE would allocate out of bounds.
    valid = all(math.isfinite(v) and v >= 1 / MAX_SCALE for v in state[key].tolist())
    try:
        gm = dynoswap.load(folder)
    except CheckpointError:
        assert not valid
    else:
        assert valid
        gm.eval()
        with torch.no_grad():
            gm(torch.zeros(1, 3, 32, 28))


def test_sizes_recorded_by_the_engine_round_trip(tmp_path):
    gm, _ = dynoswap.convert(SOURCE.build(), (32, 28), source=SOURCE, sizes=[(20, 13), (9, 7)])
    loaded = dynoswap.load(dynoswap.save(gm, tmp_path / "m"))
    assert recipe_of(loaded).options.sizes == [(20, 13), (9, 7)]
    assert recipe_of(loaded).to_dict() == gm.meta["dynoswap"]


def test_a_model_converted_without_source_has_a_recipe_but_cannot_be_saved(tmp_path):
    gm, _ = dynoswap.convert(SOURCE.build(), (32, 28))
    assert recipe_of(gm).source is None and recipe_of(gm).input_size == (32, 28)
    with pytest.raises(dynoswap.io.SaveError, match="pass source= to convert"):
        dynoswap.save(gm, tmp_path / "m")
