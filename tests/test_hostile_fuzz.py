"""Fuzzing the documents dynoswap reads from untrusted files: recipe, config (YAML preset), checkpoint manifest.

Whatever the structure (depth, size, types), reading gives a value or the module's own typed
error with a one-line message naming the file: never another exception, never a hang.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dynoswap
from dynoswap.errors import CheckpointError, DynoswapError, PresetError, RecipeError
from dynoswap.io.bounded import MAX_DEPTH, loads_yaml
from dynoswap.io.recipe import Recipe, recipe_of
from dynoswap.models import ModelSource
from dynoswap.presets import parse_preset
from dynoswap.train.checkpointing import save_checkpoint, verify_checkpoint

SOURCE = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10, "widths": [8, 16]})
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


def nest(value: Any, depth: int) -> Any:
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``doc`` (keys and indices)."""
    found = [prefix]
    if isinstance(doc, dict):
        for key, value in doc.items():
            found += paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += paths(value, (*prefix, i))
    return found


def replaced(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    copy = json.loads(json.dumps(doc))
    parent = copy
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return copy


@pytest.fixture(scope="module")
def recipe_document() -> dict[str, Any]:
    gm, _ = dynoswap.convert(SOURCE.build(), (32, 32), source=SOURCE)
    return json.loads(recipe_of(gm).to_json())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    gm, _ = dynoswap.convert(SOURCE.build(), (32, 32), source=SOURCE)
    return save_checkpoint(tmp_path_factory.mktemp("run"), gm, {"epoch": 1})


def one_line_naming(exc: BaseException, where: str) -> None:
    assert "\n" not in str(exc) and where in str(exc), str(exc)


@FUZZ
@given(data=st.data(), value=json_values, depth=st.integers(0, 3 * MAX_DEPTH))
def test_recipe_documents_of_any_structure_read_or_raise_recipe_errors(recipe_document, data, value, depth):
    path = data.draw(st.sampled_from(paths(recipe_document)))
    document = replaced(recipe_document, path, nest(value, depth))
    try:
        recipe = Recipe.from_json(json.dumps(document), "fuzz/recipe.json")
    except RecipeError as exc:
        one_line_naming(exc, "fuzz/recipe.json")
    else:
        assert Recipe.from_json(recipe.to_json()).to_dict() == recipe.to_dict()  # what reads, round-trips


@FUZZ
@given(value=json_values, depth=st.integers(0, 3 * MAX_DEPTH))
def test_any_json_document_is_a_recipe_or_a_recipe_error(value, depth):
    try:
        Recipe.from_json(json.dumps(nest(value, depth)), "fuzz/recipe.json")
    except RecipeError as exc:
        one_line_naming(exc, "fuzz/recipe.json")


PRESET = {"model": "resnet50", "convert": {"init_scale": 0.5, "input_size": [224, 224]}, "train": {"epochs": 1}}


@FUZZ
@given(data=st.data(), value=json_values, depth=st.integers(0, 3 * MAX_DEPTH))
def test_configs_of_any_structure_parse_or_raise_preset_errors(data, value, depth):
    path = data.draw(st.sampled_from(paths(PRESET)))
    document = replaced(PRESET, path, nest(value, depth))
    try:
        # Through the bounded YAML reader, as a --config file is read (JSON is YAML).
        parsed = loads_yaml(json.dumps(document), "fuzz.yaml", PresetError)
        parse_preset(parsed, "fuzz.yaml", Path("fuzz.yaml"))
    except PresetError as exc:
        one_line_naming(exc, "fuzz.yaml")
    except DynoswapError as exc:  # a config naming user code is refused by the trust policy
        assert "fuzz.yaml" in str(exc) and "\n" not in str(exc)


@FUZZ
@given(data=st.data(), value=json_values, depth=st.integers(0, 3 * MAX_DEPTH))
def test_manifests_of_any_structure_verify_or_raise_checkpoint_errors(checkpoint, data, value, depth):
    manifest_file = checkpoint / "manifest.json"
    original = manifest_file.read_text()
    document = json.loads(original)
    path = data.draw(st.sampled_from(paths(document)))
    try:
        manifest_file.write_text(json.dumps(replaced(document, path, nest(value, depth))))
        try:
            epoch = verify_checkpoint(checkpoint)
        except CheckpointError as exc:
            one_line_naming(exc, str(checkpoint))
        else:
            assert isinstance(epoch, int)
    finally:
        manifest_file.write_text(original)
    assert verify_checkpoint(checkpoint) == 1


@FUZZ
@given(st.text(max_size=200))
def test_model_kwargs_yaml_of_any_text_parses_or_is_refused(text):
    import yaml

    from dynoswap.errors import OptionError

    try:
        value = loads_yaml(text, "--model-kwargs x", OptionError, syntax_errors=False)
    except OptionError as exc:
        one_line_naming(exc, "--model-kwargs x")
    except yaml.YAMLError:
        pass  # the CLI keeps invalid YAML as a plain string
    else:
        assert value is None or isinstance(value, (str, int, float, bool, list, dict)) or math.isnan(value)
