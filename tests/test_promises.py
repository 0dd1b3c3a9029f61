"""README promises that had no test: file modes, the converted-model figures, the r = 0.5 identity.

Each test reads the figure or the rule from README.md itself (not a copy), and compares it with
what the code does or prints, or with an independent computation.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.cost import count_gmacs
from dynoswap.layers import DynOPool2d
from dynoswap.models import ModelSource

README = Path(__file__).parents[1] / "README.md"
TEXT = README.read_text()
ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
runner = CliRunner()


# -- file modes ----------------------------------------------------------------------------
def _modes(folder: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(folder.stat().st_mode)}
    for path in folder.rglob("*"):
        found[str(path.relative_to(folder))] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_saved_files_and_folders_get_the_umasks_normal_modes(tmp_path, umask):
    stated = re.search(
        r"Files get the umask's normal modes \((0\d{3}) files and (0\d{3}) folders under umask (0\d{3})\)", TEXT
    )
    assert stated is not None, "the README's file-mode promise moved: update this test"
    file_mode, folder_mode, usual = (int(v, 8) for v in stated.groups())
    assert (file_mode, folder_mode) == (0o666 & ~usual, 0o777 & ~usual)  # the stated figures are the rule at 022
    source = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10, "widths": [8, 16]})
    gm, _ = dynoswap.convert(source.build(), (32, 32), source=source)
    previous = os.umask(umask)
    try:
        folder = dynoswap.save(gm, tmp_path / "m")
    finally:
        os.umask(previous)
    modes = _modes(folder)
    assert set(modes) == {".", "recipe.json", "model.safetensors"}
    for name, mode in modes.items():
        want = (0o777 if name == "." else 0o666) & ~umask
        assert mode == want, f"{name}: {mode:o}, want {want:o} under umask {umask:03o}"


# -- the converted-model figures -----------------------------------------------------------
def _readme_json_example() -> dict:
    block = re.search(r"`--json` prints exactly one object.*?```json\n(.*?)```", TEXT, flags=re.DOTALL)
    assert block is not None
    return json.loads(block.group(1).replace(", ...]", "]"))


def test_the_readme_json_example_is_what_convert_prints():
    example = _readme_json_example()
    result = runner.invoke(app, ["convert", example["model"], "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert set(example) <= set(printed)
    for key, value in example.items():
        if key == "gmacs":
            assert round(printed[key], 3) == value
        elif key == "dynopools":
            assert printed[key][: len(value)] == value
        else:
            assert printed[key] == value, key
    assert printed["params"] == sum(p.numel() for p in torchvision.models.resnet50().parameters()) + 2 * len(
        {d["group"] for d in printed["dynopools"]}
    )  # the original's parameters and one (2,) alpha per tie group


def _measure_table() -> dict[str, list[str]]:
    head = TEXT.index("| measure (224×224, 1000 classes) |")
    lines = TEXT[head:].split("\n\n")[0].splitlines()
    columns = [c.strip() for c in lines[0].strip("|").split("|")][1:]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return {"columns": columns, **rows}


def _stated(cell: str) -> tuple[float, int]:
    """The figure dynoswap measured in a cell (before any parenthesised paper value) and its decimals."""
    figure = cell.split("(")[0].strip().rstrip("%")
    return float(figure), len(figure.split(".")[1]) if "." in figure else 0


NETWORKS = {"ResNet-50": "resnet50", "MobileNetV2": "mobilenet_v2", "VGG-16": "vgg16"}


@pytest.mark.parametrize("column", list(NETWORKS))
def test_the_readme_cost_figures_are_what_the_code_counts(column):
    table = _measure_table()
    i = table["columns"].index(column)
    model = torchvision.models.get_model(NETWORKS[column], num_classes=1000)
    original = count_gmacs(model, (224, 224))
    converted, _ = dynoswap.convert(model, (224, 224))
    after = count_gmacs(converted, (224, 224))
    for row, value in (
        ("original, fvcore (paper)", original.total),
        ("converted at init, DynOPools included", after.total),
        ("DynOPool share (supplement Table 3)", 100 * after.dynopool / after.total),
    ):
        figure, decimals = _stated(table[row][i])
        assert round(value, decimals) == figure, f"{column}, {row}: README {figure}, counted {value:.6f}"


# -- r = 0.5 on even sizes is a 2x2 max pool, checked independently -------------------------
def _interpolated_max(x: torch.Tensor, out: tuple[int, int]) -> torch.Tensor:
    """The README's forward rule, written out: bilinear grid at 2x the output, then a 2x2 max by reshaping."""
    grid = F.interpolate(x, size=(2 * out[0], 2 * out[1]), mode="bilinear", align_corners=False)
    n, c = x.shape[:2]
    return grid.reshape(n, c, out[0], 2, out[1], 2).amax(dim=(3, 5))


@pytest.mark.parametrize("size", [(12, 14), (8, 8), (4, 6)])
def test_half_scale_equals_an_independent_max_over_the_interpolated_grid(size):
    assert "At r = 0.5 on even sizes" in TEXT
    x = torch.randn(3, 5, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x_ref = x.clone().requires_grad_()
    x = x.requires_grad_()
    layer = DynOPool2d(0.5).double()
    out = layer(x)
    expected = _interpolated_max(x_ref, (size[0] // 2, size[1] // 2))
    assert out.shape == expected.shape and torch.equal(out, expected)
    grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)  # random values: no ties, one winner per window in both


@pytest.mark.parametrize("scale", [(0.6, 0.45), (0.8, 0.3)])
def test_moved_scales_query_the_interpolated_grid(scale):
    x = torch.randn(2, 4, 15, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layer = DynOPool2d(scale).double()
    out = layer(x)
    expected = _interpolated_max(x, layer.output_size((15, 13)))
    assert torch.allclose(out, expected, rtol=0, atol=1e-12)
