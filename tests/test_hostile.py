"""dynoswap against hostile files and careless hands (issue 17): one test per attack class.

1. Ownership by content: only what provably is dynoswap's output of the same kind is replaced.
2. No write through a link: planted links at dynoswap's names are never followed or renamed;
   one trainer per run folder; names near 255 bytes; reading needs no write; a full disk leaves nothing.
3. Bounded untrusted input: bombs are refused quickly under a memory cap (RLIMIT_AS).
4. Messages: markup and control characters in paths, no unsafe advice, no frame dumps.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.errors import CheckpointError, OutputExistsError, OutputLockedError
from dynoswap.io import output
from dynoswap.io.output import repair_if_needed
from dynoswap.io.run import file_sha256
from dynoswap.models import ModelSource
from dynoswap.train import checkpointing
from dynoswap.train.checkpointing import (
    MARKER_FILE,
    load_checkpoint,
    prepare_run_folder,
    save_checkpoint,
    verify_checkpoint,
)

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
ROOT = str(Path(dynoswap.__file__).parents[1])
TINY = ["vgg-tiny", "--input-size", "32", "32", "--num-classes", "10", "--model-kwargs", "widths=[8, 16]"]
SOURCE = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10, "widths": [8, 16]})
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny():
    gm, _ = dynoswap.convert(SOURCE.build(), (32, 32), source=SOURCE)
    return gm


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder``: file bytes, or where a link points."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        key = str(p.relative_to(folder))
        if p.is_symlink():
            out[key] = "-> " + os.readlink(p)
        elif p.is_file():
            out[key] = p.read_bytes()
    return out


def convert_cli(*args: str):
    return runner.invoke(app, ["convert", *TINY, *args], env=ENV)


# == 1. ownership by content ==================================================================
def test_a_folder_with_dynoswap_file_names_but_foreign_content_is_never_replaced(tmp_path, tiny):
    dinner = tmp_path / "dinner"
    dinner.mkdir()
    (dinner / "recipe.json").write_text('{"title": "lasagne"}')
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "recipe.json").write_text('{"format": "dynoswap-saved-model", "format_version": 1}')
    (hf / "model.safetensors").write_bytes(b"weights of another tool")
    for folder in (dinner, hf):
        before = tree(folder)
        result = convert_cli("-o", str(folder), "--force")
        assert result.exit_code == 2, result.output
        assert f"{folder} holds a folder with" in result.stderr and "not a dynoswap saved model" in result.stderr
        for overwrite in (True, False):
            with pytest.raises(OutputExistsError, match="not a dynoswap saved model; refusing to replace it"):
                dynoswap.save(tiny, folder, overwrite=overwrite)
        assert tree(folder) == before
    # A real saved model is still replaced with --force.
    mine = dynoswap.save(tiny, tmp_path / "mine")
    assert convert_cli("-o", str(mine), "--force").exit_code == 0


def test_train_force_never_deletes_entries_of_a_folder_dynoswap_did_not_mark(tmp_path):
    proj = tmp_path / "proj"
    (proj / "checkpoint").mkdir(parents=True)
    (proj / "checkpoint" / "epoch=41.ckpt").write_bytes(b"another tool's checkpoint")
    (proj / "log.jsonl").write_text('{"loss": 0.1}\n')
    before = tree(proj)
    with pytest.raises(OutputExistsError, match="no dynoswap run marker"):
        prepare_run_folder(proj, force=True)
    result = runner.invoke(app, ["train", "vgg-tiny", "--data", "barcodes", "--out", str(proj), "--force"], env=ENV)
    assert result.exit_code == 2 and "not a dynoswap run; refusing to replace them" in result.stderr
    assert tree(proj) == before
    # A run dynoswap marked is started over with force, and only its run entries go.
    run = tmp_path / "run"
    prepare_run_folder(run)
    assert json.loads((run / MARKER_FILE).read_text())["format"] == "dynoswap-run"
    (run / "log.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already holds a training run"):
        prepare_run_folder(run)
    prepare_run_folder(run, force=True)
    assert not (run / "log.jsonl").exists() and (run / "notes.txt").read_text() == "mine"


def test_plot_is_an_owned_output_checked_before_the_work(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from dynoswap.io.figures import is_own_plot

    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"holiday" * 10)
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"victim")
    (tmp_path / "l.png").symlink_to(victim)
    for target in (photo, tmp_path / "l.png"):
        for force in ([], ["--force"]):
            result = runner.invoke(app, ["inspect", *TINY, "--plot", str(target), *force], env=ENV)
            assert result.exit_code == 2, result.output
            assert "not a dynoswap plot; refusing to replace it" in result.stderr
    assert photo.read_bytes().endswith(b"holiday") and victim.read_bytes() == b"victim"
    mine = tmp_path / "stages.png"
    assert runner.invoke(app, ["inspect", *TINY, "--plot", str(mine)], env=ENV).exit_code == 0
    assert is_own_plot(mine) and not is_own_plot(photo)
    again = runner.invoke(app, ["inspect", *TINY, "--plot", str(mine)], env=ENV)
    assert again.exit_code == 2 and "already holds a dynoswap plot; pass --force" in again.stderr
    assert runner.invoke(app, ["inspect", *TINY, "--plot", str(mine), "--force"], env=ENV).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.png", "photo.png", "stages.png", "victim.png"]

    import dynoswap.cli.inspect as inspect_cli

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before --plot was checked")

    monkeypatch.setattr(inspect_cli, "load_model", fail)
    result = runner.invoke(app, ["inspect", *TINY, "--plot", str(tmp_path / "p.txt")], env=ENV)
    assert result.exit_code == 2 and "must end in .png" in result.stderr


def test_an_export_under_another_format_s_suffix_is_refused_before_the_work(tmp_path, monkeypatch, tiny):
    import dynoswap.cli.export as export_cli
    from dynoswap.errors import ExportError
    from dynoswap.export import export_model

    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded before -o was checked")

    monkeypatch.setattr(export_cli, "load_model", fail)
    result = runner.invoke(app, ["export", "m", "--format", "pt2", "-o", str(tmp_path / "x.onnx")], env=ENV)
    assert result.exit_code == 2 and "a pt2 file must be named *.pt2" in result.stderr
    with pytest.raises(ExportError, match="must be named"):
        export_model(tiny, tmp_path / "x.onnx", "pt2")
    assert list(tmp_path.iterdir()) == []


# == 2. no write through a link ==================================================================
def test_a_link_at_the_lock_name_is_refused_not_followed(tmp_path):
    victim = tmp_path / "victim"
    (tmp_path / ".m.dynoswap-lock").symlink_to(victim)
    result = convert_cli("-o", str(tmp_path / "m"))
    assert result.exit_code == 2 and "is a symbolic link, not dynoswap's lock file" in result.stderr
    assert not victim.exists() and not (tmp_path / "m").exists()
    victim.write_text("keep")
    assert convert_cli("-o", str(tmp_path / "m")).exit_code == 2 and victim.read_text() == "keep"


def test_repair_never_renames_what_it_did_not_create(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "secret").write_text("s")
    m = tmp_path / "m"
    (tmp_path / ".m.dynoswap-old").symlink_to(target)  # the old fixed names: never looked at
    for mode in (0o755, 0o700):  # a planted work folder, open or private, with a forged record
        work = tmp_path / f".m.dynoswap-work-{mode:o}"
        work.mkdir(mode=mode)
        os.chmod(work, mode)
        (work / "new").symlink_to(target)
        st = (work / "new").lstat()
        (work / "record.json").write_text(json.dumps({"new": [st.st_dev, st.st_ino]}))
    repair_if_needed(m)
    assert not m.exists() and (target / "secret").read_text() == "s"
    result = runner.invoke(app, ["inspect", str(m)], env=ENV)
    assert result.exit_code == 2 and not m.exists()


def test_run_files_are_never_written_through_planted_links(tmp_path, tiny):
    run = tmp_path / "run"
    prepare_run_folder(run)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (run / ".log.jsonl.tmp").symlink_to(victim)
    (run / "checkpoint.tmp").symlink_to(victim_dir)
    save_checkpoint(run, tiny, {"epoch": 1}, log_record={"epoch": 1})
    assert verify_checkpoint(run / "checkpoint") == 1
    assert victim.read_text() == "keep" and list(victim_dir.iterdir()) == []
    # A link planted at the run lock's name is refused.
    other = tmp_path / "other"
    other.mkdir()
    (other / checkpointing.RUN_LOCK_FILE).symlink_to(victim)
    with pytest.raises(OutputExistsError, match="is a symbolic link"):
        prepare_run_folder(other)
    assert victim.read_text() == "keep"


HOLD_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from dynoswap.train.checkpointing import prepare_run_folder

    prepare_run_folder(sys.argv[1])
    Path(sys.argv[2]).touch()
    while not Path(sys.argv[3]).exists():
        time.sleep(0.02)
    """
)


def test_a_second_trainer_on_the_same_run_folder_is_refused(tmp_path):
    run, started, release = tmp_path / "run", tmp_path / "started", tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD_RUN, str(run), str(started), str(release)], env={**os.environ, "PYTHONPATH": ROOT}
    )
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(OutputLockedError, match="is being trained into by another process"):
            prepare_run_folder(run, force=True)
        args = ["train", "vgg-tiny", "--data", "barcodes", "--out", str(run)]
        for extra in ([], ["--force"], ["--resume"]):
            result = runner.invoke(app, [*args, *extra, "--max-steps", "1", "--epochs", "1"], env=ENV)
            assert result.exit_code == 2, result.output
            assert "is being trained into by another process" in result.stderr
    finally:
        release.touch()
        assert first.wait(timeout=120) == 0
    prepare_run_folder(run, force=True)  # free again once the first one ended


def test_output_names_near_255_bytes_work(tmp_path, tiny):
    name = "m" * 245
    result = convert_cli("-o", str(tmp_path / name))
    assert result.exit_code == 0, result.output
    assert dynoswap.load(tmp_path / name) is not None
    assert dynoswap.save(tiny, tmp_path / ("é" * 127)).is_dir()  # 254 bytes in UTF-8
    assert sorted(len(p.name.encode()) for p in tmp_path.iterdir()) == [245, 254]


def test_reading_needs_no_write(tmp_path, tiny, monkeypatch):
    path = dynoswap.save(tiny, tmp_path / "m")
    (tmp_path / ".m.dynoswap-lock").write_text("")  # a kill after the swap leaves the lock file
    (tmp_path / ".m.dynoswap-work-leftover").mkdir(mode=0o700)  # and a kill mid-write its work folder
    real_open = os.open

    def read_only(file, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, flags, *args, **kwargs)

    def no_rmtree(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(output.os, "open", read_only)
    monkeypatch.setattr(output.shutil, "rmtree", no_rmtree)
    assert repair_if_needed(path) is None
    assert dynoswap.load(path) is not None
    result = runner.invoke(app, ["inspect", str(path), "--json"], env=ENV)
    assert result.exit_code == 0, result.output


def test_a_full_disk_during_a_checkpoint_leaves_the_previous_one_and_no_temp(tmp_path, tiny, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, tiny, {"epoch": 1}, log_record={"epoch": 1})
    before = tree(run)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.torch, "save", full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(run, tiny, {"epoch": 2}, log_record={"epoch": 2})
    assert tree(run) == before and verify_checkpoint(run / "checkpoint") == 1


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MiB tmpfs (skipped where mounting is not allowed); yields its mount point."""
    point = tmp_path / "tmpfs"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs permission to mount a tmpfs")
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_a_really_full_disk_during_a_checkpoint_leaves_no_temp(tmpfs, tiny):
    run = tmpfs / "run"
    save_checkpoint(run, tiny, {"epoch": 1}, log_record={"epoch": 1})
    before = tree(run)
    with open(tmpfs / "filler", "wb") as fh:  # fill the disk
        with pytest.raises(OSError):
            while True:
                fh.write(b"x" * 65536)
                fh.flush()
    with pytest.raises(OSError) as caught:
        save_checkpoint(run, tiny, {"epoch": 2}, log_record={"epoch": 2})
    assert caught.value.errno == errno.ENOSPC or "No space" in str(caught.value)
    assert tree(run) == before and verify_checkpoint(run / "checkpoint") == 1


def test_a_model_on_read_only_media_reads_despite_leftovers(tmpfs, tiny):
    path = dynoswap.save(tiny, tmpfs / "m")
    (tmpfs / ".m.dynoswap-lock").write_text("")
    (tmpfs / ".m.dynoswap-work-leftover").mkdir(mode=0o700)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert dynoswap.load(path) is not None
    result = runner.invoke(app, ["inspect", str(path), "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmpfs.iterdir()) == [".m.dynoswap-lock", ".m.dynoswap-work-leftover", "m"]


@pytest.mark.parametrize("entry", ["../../victim", "/etc/hostname", "a/../../victim", "", "..\\victim"])
def test_a_manifest_entry_outside_the_checkpoint_is_refused(tmp_path, tiny, entry):
    run = tmp_path / "run"
    folder = save_checkpoint(run, tiny, {"epoch": 1})
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"][entry] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="is not a file inside the checkpoint"):
        verify_checkpoint(folder)


def test_a_link_inside_a_checkpoint_is_refused(tmp_path, tiny):
    folder = save_checkpoint(tmp_path / "run", tiny, {"epoch": 1})
    (folder / "log.jsonl").unlink()
    (folder / "log.jsonl").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="log.jsonl is missing"):
        verify_checkpoint(folder)


# == 3. bounded untrusted input ==================================================================
#: Address-space cap of the bomb process: what importing torch and building vgg-tiny needs, plus headroom.
BOMB_LIMIT = 4 << 30

BOMBS = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    import torch
    from dynoswap.cli.common import parse_kwargs
    from dynoswap.errors import DynoswapError
    from dynoswap.export.freeze import FrozenPool
    from dynoswap.io.checkpoint import load_state_dict_file
    from dynoswap.io.recipe import Recipe
    from dynoswap.layers import DynOPool2d
    from dynoswap.presets import load_preset_file
    from dynoswap.sources import build_model
    from dynoswap.train.checkpointing import read_log_file
    from dynoswap.validate import check_convert_args

    root = Path(sys.argv[1])

    def alpha_forward():
        pool = DynOPool2d()
        with torch.no_grad():
            pool.alpha.fill_(1e-12)
        pool(torch.zeros(1, 1, 8, 8))

    frozen = {"name": "p", "aggregate": "max", "alpha": [0.5, 0.5], "precision": "float32",
              "in_size": [8, 8], "out_size": [200000, 200000]}
    cases = {
        "sparse 8 GB recipe": lambda: Recipe.read(root / "sparse"),
        "recipe nested 100k deep": lambda: Recipe.read(root / "deep"),
        "config nested 100k deep": lambda: load_preset_file(root / "deep.yaml"),
        "YAML alias bomb": lambda: parse_kwargs(["widths=" + (root / "bomb.yaml").read_text()]),
        "log nested 100k deep": lambda: read_log_file(root / "log.jsonl"),
        "2 GiB garbage weights": lambda: load_state_dict_file(root / "garbage.pth"),
        "safetensors header of 2**60 bytes": lambda: load_state_dict_file(root / "w.safetensors"),
        "vgg-tiny convs_per_stage=200000": lambda: build_model("dynoswap", "vgg-tiny", {"convs_per_stage": 200000}),
        "resnet50 width_per_group=2048": lambda: build_model("torchvision", "resnet50", {"width_per_group": 2048}),
        "input size 100000x100000": lambda: check_convert_args(torch.nn.Identity(), (100000, 100000)),
        "frozen out_size 200000^2": lambda: FrozenPool.from_dict(frozen),
        "alpha 1e-12 forward": alpha_forward,
    }
    for name, case in cases.items():
        started = time.perf_counter()
        try:
            case()
            outcome = {"type": None, "message": "accepted"}
        except (DynoswapError, ValueError) as exc:
            outcome = {"type": type(exc).__name__, "message": str(exc)}
        outcome.update(name=name, seconds=round(time.perf_counter() - started, 3))
        print(json.dumps(outcome), flush=True)
    """
)


def make_bombs(root: Path) -> None:
    (root / "sparse").mkdir()
    with open(root / "sparse" / "recipe.json", "wb") as fh:
        fh.truncate(8 << 30)
    (root / "deep").mkdir()
    (root / "deep" / "recipe.json").write_text("[" * 100_000 + "]" * 100_000)
    (root / "deep.yaml").write_text("a: " + "[" * 100_000 + "]" * 100_000)
    # About 500 bytes that stand for 9**10 values once the aliases are expanded.
    levels = ["&a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    (root / "bomb.yaml").write_text("[" + ", ".join(levels) + "]")
    (root / "log.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with open(root / "garbage.pth", "wb") as fh:
        fh.write(b"PK\x03\x04")
        fh.truncate(2 << 30)
    with open(root / "w.safetensors", "wb") as fh:
        fh.write((1 << 60).to_bytes(8, "little") + b"{}")
        fh.truncate(1 << 30)


def run_bombs(root: Path) -> tuple[list[dict], int]:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (BOMB_LIMIT, BOMB_LIMIT))

    proc = subprocess.run(
        [sys.executable, "-c", BOMBS, str(root)],
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        preexec_fn=cap,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return [json.loads(line) for line in proc.stdout.splitlines()], peak_kib


def test_bomb_inputs_are_refused_under_a_memory_cap(tmp_path):
    make_bombs(tmp_path)
    results, peak_kib = run_bombs(tmp_path)
    print("\n".join(f"{r['seconds']:8.3f} s  {r['name']}: {r['type']}: {r['message'][:120]}" for r in results))
    print(f"peak RSS of the bomb process: {peak_kib // 1024} MiB")
    by_name = {r["name"]: r for r in results}
    expected = {
        "sparse 8 GB recipe": ("RecipeError", "recipe.json: the recipe is larger than 1048576 bytes"),
        "recipe nested 100k deep": ("RecipeError", "recipe.json: nested deeper than 32 levels"),
        "config nested 100k deep": ("PresetError", "deep.yaml: nested deeper than 32 levels"),
        "YAML alias bomb": ("OptionError", "--model-kwargs widths: stands for more than 100000 values"),
        "log nested 100k deep": ("CheckpointError", "log.jsonl: line 1: nested deeper than 32 levels"),
        "2 GiB garbage weights": ("CheckpointError", "cannot read"),
        "safetensors header of 2**60 bytes": ("CheckpointError", "bad header length"),
        "vgg-tiny convs_per_stage=200000": ("ModelError", "asks for more than 1,000,000,000 parameters"),
        "resnet50 width_per_group=2048": ("ModelError", "asks for more than 1,000,000,000 parameters"),
        "input size 100000x100000": ("ValueError", "input_size 100000x100000 is too large"),
        "frozen out_size 200000^2": ("RecipeError", "size 200000x200000 is too large"),
        "alpha 1e-12 forward": ("ValueError", "more than 8x upsampling"),
    }
    assert set(by_name) == set(expected)
    for name, (kind, text) in expected.items():
        assert by_name[name]["type"] == kind and text in by_name[name]["message"], by_name[name]
        assert "\n" not in by_name[name]["message"]


def test_bomb_refusals_are_one_line_with_exit_code_2(tmp_path):
    make_bombs(tmp_path)
    cases = [
        (["inspect", str(tmp_path / "sparse")], "larger than 1048576 bytes"),
        (["inspect", str(tmp_path / "deep")], "nested deeper than 32 levels"),
        (["convert", "vgg-tiny", "--config", str(tmp_path / "deep.yaml")], "deep.yaml: nested deeper than 32"),
        (["inspect", "vgg-tiny", "--model-kwargs", "widths=" + (tmp_path / "bomb.yaml").read_text()], "alias bomb"),
        (["inspect", "vgg-tiny", "--input-size", "100000", "100000"], "--input-size 100000x100000 is too large"),
        (["convert", *TINY, "--init-scale", "1e30"], "--init-scale must be a finite number > 0 and at most 8"),
        (["inspect", "resnet50", "--model-kwargs", "width_per_group=2048"], "1,000,000,000 parameters"),
        (["inspect", "resnet50", "--input-size", "8192", "8192"], "GiB of activations in one forward, more than"),
    ]
    for args, text in cases:
        result = runner.invoke(app, args, env=ENV)
        assert result.exit_code == 2, (args, result.output)
        assert result.stderr.count("\n") == 1 and text in result.stderr, (args, result.stderr)


# == 4. messages ====================================================================================
@pytest.mark.parametrize("name", ["a[/b]", "[bold]x", "e\x1b[31mred", "tab\there"])
def test_markup_and_control_characters_in_output_paths(tmp_path, name):
    result = convert_cli("-o", str(tmp_path / name))
    assert result.exit_code == 0, result.output
    shown = name.replace("\x1b", "\\x1b").replace("\t", "\\t")
    assert result.stdout.splitlines()[-1] == f"saved to {tmp_path / shown}"
    assert "\x1b" not in result.stdout and (tmp_path / name).is_dir()


def test_markup_in_a_run_folder_and_plot_name_is_printed_as_is(tmp_path):
    pytest.importorskip("matplotlib")
    run, plot = tmp_path / "run[/x]", tmp_path / "[bold]p.png"
    args = ["train", *TINY[:1], "--data", "barcodes", "--model-kwargs", "widths=[8, 16]", "--out", str(run)]
    result = runner.invoke(
        app, [*args, "--max-steps", "1", "--epochs", "1", "--no-progress", "--plot", str(plot)], env=ENV
    )
    assert result.exit_code == 0, result.output
    printed = "".join(result.stdout.split())  # long paths wrap
    assert f"->{run}" in printed and f"plot:{plot}" in printed
    assert (run / "checkpoint").is_dir() and plot.is_file()


def test_error_lines_show_control_characters(tmp_path):
    result = runner.invoke(app, ["inspect", str(tmp_path / "no\x1b[2Jsuch")], env=ENV)
    assert result.exit_code == 2 and "\x1b" not in result.stderr and "no\\x1b[2Jsuch" in result.stderr


def test_a_pickled_train_state_is_refused_without_unsafe_advice(tmp_path, tiny):
    folder = save_checkpoint(tmp_path / "run", tiny, {"epoch": 1})
    (folder / "train_state.pt").write_bytes(pickle.dumps({"epoch": 1, "x": Path("/")}))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"]["train_state.pt"] = file_sha256(folder / "train_state.pt")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as caught:
        load_checkpoint(folder, tiny)
    assert "holds pickled objects" in str(caught.value)
    assert "weights_only" not in str(caught.value) and "\n" not in str(caught.value)


def test_dynopool_refuses_empty_inputs_with_a_clear_error():
    from dynoswap.layers import DynOPool2d

    pool = DynOPool2d()
    for shape in ((1, 0, 8, 8), (1, 3, 0, 0), (1, 3, 0, 8)):
        with pytest.raises(ValueError, match="at least one channel and a non-empty image"):
            pool(torch.zeros(shape))
    assert pool(torch.zeros(1, 3, 8, 8)).shape == (1, 3, 4, 4)


def test_a_bad_init_scale_is_refused_up_front_without_a_frame_dump():
    for value in ("1e30", "nan", "inf", "-1"):
        result = convert_cli("--init-scale", value)
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "Exception raised from" not in result.stderr and "frame #" not in result.stderr


def test_a_pt2_export_prints_no_torch_warnings_and_carries_dynoswap_s_mark(tmp_path, tiny, capfd):
    import zipfile

    from dynoswap.export import export_model
    from dynoswap.io.output import get_output_kind

    export_model(tiny, tmp_path / "m.pt2", "pt2")
    assert "Unable to load package" not in capfd.readouterr().err
    assert get_output_kind("pt2 export").detect(tmp_path / "m.pt2")
    with zipfile.ZipFile(tmp_path / "m.pt2") as archive, zipfile.ZipFile(tmp_path / "foreign.pt2", "w") as foreign:
        for info in archive.infolist():  # the same archive without dynoswap's extra file
            if not info.filename.endswith("/extra/dynoswap"):
                foreign.writestr(info, archive.read(info))
    assert not get_output_kind("pt2 export").detect(tmp_path / "foreign.pt2")
    with pytest.raises(OutputExistsError, match="not a dynoswap pt2 export"):
        export_model(tiny, tmp_path / "foreign.pt2", "pt2", overwrite=True)


def test_onnx_files_are_dynoswap_s_only_with_its_metadata_mark(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    from dynoswap.export.formats import MARK_KEY, MARK_VALUE
    from dynoswap.io.output import get_output_kind

    graph = helper.make_graph([], "g", [], [])
    for name, props in (
        ("foreign.onnx", {}),
        ("other.onnx", {"dynoswap": "other"}),
        ("mine.onnx", {MARK_KEY: MARK_VALUE}),
    ):
        model = helper.make_model(graph)
        helper.set_model_props(model, props)
        onnx.save(model, str(tmp_path / name))
    detect = get_output_kind("onnx export").detect
    assert [detect(tmp_path / n) for n in ("foreign.onnx", "other.onnx", "mine.onnx")] == [False, False, True]
