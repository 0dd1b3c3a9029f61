"""Output that fits: names shortened in the middle at 80 columns, pipes without a width, full help, one
tie-group numbering, cost notes in the convert table, whole epochs on plot axes."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from torch import nn
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.cli.render import dynopool_table, group_numbers
from dynoswap.display import ELLIPSIS, shorten_middle
from dynoswap.train import DATA_HANDLERS

runner = CliRunner()
PLAIN = {"NO_COLOR": "1", "TERM": "dumb"}


@pytest.mark.parametrize(
    ("text", "width", "suffix", "expected"),
    [
        ("layer2.0.downsample.0", 15, "", "layer2…sample.0"),
        ("layer2.0.downsample.0", 21, "", "layer2.0.downsample.0"),
        ("layer2.0.downsample.0_dynopool", 20, "_dynopool", "laye…mple.0_dynopool"),
        ("layer2.0.downsample.0_dynopool", 12, "_dynopool", "layer…nopool"),  # no room: a plain middle cut
        ("abc", 1, "", ELLIPSIS),
        ("abc", 0, "", ""),
    ],
)
def test_long_names_lose_their_middle_never_their_end(text, width, suffix, expected):
    short = shorten_middle(text, width, suffix)
    assert short == expected
    assert len(short) <= width
    if ELLIPSIS in short and width > 1:
        head, tail = short.split(ELLIPSIS)
        assert text.startswith(head) and text.endswith(tail) and len(tail) >= len(head)


NAMES = st.text(st.characters(blacklist_characters=ELLIPSIS), max_size=60)


@given(NAMES, st.integers(0, 70), st.sampled_from(["", "_dynopool"]))
def test_any_name_fits_and_keeps_its_start_and_end(text, width, suffix):
    short = shorten_middle(text, width, suffix)
    assert len(short) <= width
    if len(text) <= width:
        assert short == text
    elif width > 1:
        head, _, tail = short.partition(ELLIPSIS)
        assert text.startswith(head) and text.endswith(tail) and len(head) + len(tail) == width - 1


def _render(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, file=open("/dev/null", "w"), color_system=None)  # noqa: SIM115
    console.print(renderable)
    return console.export_text().splitlines()


def test_a_narrow_dynopool_table_keeps_each_names_end():
    rows = [
        {"name": f"features.{i}.block.3.downsample.0_dynopool", "scale": [0.5, 0.5], "in": [8, 8], "out": [4, 4]}
        | {"group": f"features.{i // 2}.block.3.downsample.0_dynopool"}
        for i in range(4)
    ]
    lines = _render(dynopool_table(rows), 60)
    assert max(len(line) for line in lines) <= 60
    body = [line for line in lines if "_dynopool" in line]
    assert len(body) == 4
    for i, line in enumerate(body):
        name = line.split()[0]
        assert ELLIPSIS in name and name.endswith("ple.0_dynopool") and name.startswith("fea")
        assert line.split()[-1] == str(i // 2 + 1)  # tie groups numbered from 1 in execution order


def test_tie_groups_are_numbered_from_1_in_execution_order_everywhere(tmp_path, monkeypatch):
    gm, report = dynoswap.convert(dynoswap.build_model("torchvision", "resnet18", {"num_classes": 10}), (64, 64))
    assert [r.group for r in report.replacements] == [1, 2, 2, 3, 3, 4, 4]
    for rep in report.replacements:
        assert rep.dynopool in report.groups[rep.group - 1]
    rows = dynoswap.alphas(gm)
    numbers = group_numbers([row["group"] for row in rows])
    assert [numbers[row["group"]] for row in rows] == [r.group for r in report.replacements]

    # The training plot's legend uses the same numbers, and its epoch axes have whole-number ticks.
    import dynoswap.io.figures as figures
    from dynoswap.train import plot_history

    figs = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path, force=False, **kw: figs.append(fig) or path)
    pools = [{"name": r["name"], "group": r["group"], "out": r["out_size"], "original": r["out_size"]} for r in rows]
    records = [{"epoch": e, "pools": pools, "train_acc": 0.5, "gmacs": 0.2} for e in (1, 2, 3)]
    records[0]["initial_pools"] = pools
    plot_history(records, tmp_path / "p.png")
    ax_size, ax_acc, ax_cost = figs[0].axes[:3]
    legend = [t.get_text() for t in ax_size.get_legend().get_texts()]
    assert legend == [f"{numbers[g]}: {g}" for g in numbers]
    figs[0].canvas.draw()
    for ax in (ax_size, ax_acc, ax_cost):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_the_patchify_cost_note_is_in_the_convert_table():
    model = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    _, report = dynoswap.convert(model, (32, 32))
    assert report.replacements[0].rule == "patchify_post" and report.replacements[0].cost_note
    text = " ".join(" ".join(_render(report.table(), 80)).split())
    assert f"patchify_post: {report.replacements[0].cost_note}" in text


def test_piped_output_has_no_width_one_record_per_line(tmp_path, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    args = ["train", "vgg-tiny", "--data", "barcodes", "--epochs", "2", "--max-steps", "2", "--batch-size", "16"]
    result = runner.invoke(app, [*args, "--lam", "100", "--out", str(tmp_path / "run")], env=PLAIN)
    assert result.exit_code == 0, result.output
    epochs = [line for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    for line in epochs:  # each field whole on the line, the sizes last
        fields = r"epoch \d/2  loss \S+  train_acc \S+  val_acc \S+  GMACs \S+  sizes( \d+x\d+)+"
        assert re.fullmatch(fields, line), line


COMMANDS = [[], ["convert"], ["inspect"], ["export"], ["train"], ["list"], ["profile"], ["paper", "table1"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "dynoswap")
def test_help_at_80_columns_shows_every_word(command):
    result = runner.invoke(app, [*command, "--help"], env={**PLAIN, "COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    assert ELLIPSIS not in result.stdout, "a help text was cut"


def test_train_help_names_every_data_kind():
    result = runner.invoke(app, ["train", "--help"], env={**PLAIN, "COLUMNS": "80"})
    words = set(re.findall(r"[\w:-]+", result.stdout))
    for kind in DATA_HANDLERS:
        assert kind in words or f"{kind}:PATH" in words, kind


def test_a_pipe_gets_long_lines_whole_and_columns_still_wins(monkeypatch, capsys):
    from dynoswap.cli.common import out_console

    record = "  ".join(f"field{i} {i * 1.5:.4f}" for i in range(40))  # ~600 characters
    monkeypatch.delenv("COLUMNS", raising=False)
    out_console().print(record)
    assert capsys.readouterr().out == record + "\n"
    monkeypatch.setenv("COLUMNS", "80")
    out_console().print(record)
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 80


def test_paper_table_fits_80_columns_and_cuts_no_value():
    result = runner.invoke(app, ["paper", "table1", "--dataset", "cifar100"], env={"COLUMNS": "80", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    table = result.stdout.split("\n\n")[0]
    assert ELLIPSIS not in table and all(len(line) <= 80 for line in table.splitlines())
    rows = [line.split() for line in table.splitlines() if line[:2] in ("1 ", "4 ")]
    assert ["1", "MobileNetV2", "CIFAR-100", "DynOPool-S", "32x32"] in [row[:5] for row in rows]
    assert all(row[-1] in ("ok", "rounding", "disagrees", "off") for row in rows), rows
