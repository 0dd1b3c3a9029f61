"""Outputs never destroy data: --force only over our own outputs, crash-safe swaps, one writer at a time, modes.

The crash tests kill a real writer process (SIGKILL) at each filesystem step of a
replacement and check what is at the path, then that the next run repairs it.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli import app
from dynoswap.errors import OutputExistsError, OutputLockedError
from dynoswap.io import output
from dynoswap.io.output import folder_of_only, register_output_kind, repair_if_needed, replace_output
from dynoswap.models import ModelSource

ENV = {"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"}
ROOT = str(Path(dynoswap.__file__).parents[1])
KIND = "test output"
STEPS = ("written", "ready", "moved-old", "moved-new", "cleaned")
TINY = ["vgg-tiny", "--input-size", "32", "32", "--num-classes", "10", "--model-kwargs", "widths=[8, 16]"]
runner = CliRunner()

register_output_kind(KIND, folder_of_only({"content.txt"}, "content.txt"))

WRITER = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    from dynoswap.io import output
    from dynoswap.io.output import folder_of_only, register_output_kind, replace_output

    register_output_kind("test output", folder_of_only({"content.txt"}, "content.txt"))
    path, kill_at, hold = Path(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""

    def hook(step):
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    output.STEP_HOOK = hook
    with replace_output(path, "test output", force=True) as work:
        work.mkdir()
        (work / "content.txt").write_text("new")
        if hold:
            Path(hold + ".started").touch()
            while not Path(hold + ".release").exists():
                time.sleep(0.02)
    """
)


def run_writer(path: Path, kill_at: str = "", hold: str = "") -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-c", WRITER, str(path), kill_at] + ([hold] if hold else [])
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)


def old_output(path: Path) -> Path:
    path.mkdir()
    (path / "content.txt").write_text("old")
    return path


def content(path: Path) -> str | None:
    file = path / "content.txt"
    return file.read_text() if file.is_file() else None


def leftovers(folder: Path, keep: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != keep)


# -- --force only replaces our own outputs ---------------------------------------------------
def test_force_refuses_a_foreign_folder_and_a_foreign_file(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')\n")
    (project / "README").write_text("my project\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me\n")
    for target, what in ((project, "a folder with 2 entries (README, src)"), (notes, "a file of 8 bytes")):
        result = runner.invoke(app, ["convert", *TINY, "-o", str(target), "--force"], env=ENV)
        assert result.exit_code == 2, result.output
        assert f"{target} holds {what}, not a dynoswap saved model; refusing to replace it" in result.stderr
        with pytest.raises(OutputExistsError, match="not a dynoswap saved model"):
            with replace_output(target, "saved model", force=True):
                pytest.fail("must not be reached")
    assert (project / "src" / "main.py").read_text() == "print('mine')\n" and (project / "README").exists()
    assert notes.read_text() == "keep me\n"
    assert leftovers(tmp_path, "") == ["notes.txt", "project"]


def test_force_replaces_a_saved_model_and_files_get_normal_modes(tmp_path):
    out = tmp_path / "m"
    first = runner.invoke(app, ["convert", *TINY, "-o", str(out)], env=ENV)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["convert", *TINY, "-o", str(out)], env=ENV)
    assert again.exit_code == 2 and "already holds a dynoswap saved model; pass --force to replace it" in again.stderr
    forced = runner.invoke(app, ["convert", *TINY, "--init-scale", "0.7", "-o", str(out), "--force"], env=ENV)
    assert forced.exit_code == 0, forced.output
    assert dynoswap.io.read_recipe(out)["recipe"]["options"]["init_scale"] == [0.7, 0.7]
    assert leftovers(tmp_path, "m") == []
    mask = os.umask(0)
    os.umask(mask)
    for name in ("recipe.json", "model.safetensors"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name


def test_a_bad_output_is_refused_before_the_conversion_runs(tmp_path, monkeypatch):
    import dynoswap.cli.convert as convert_cli

    def fail(*args, **kwargs):
        raise AssertionError("the conversion ran before -o was checked")

    monkeypatch.setattr(convert_cli, "run_conversion", fail)
    monkeypatch.setattr(convert_cli, "load_model", fail)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for target in (blocker, blocker / "sub"):
        result = runner.invoke(app, ["convert", *TINY, "-o", str(target)], env=ENV)
        assert result.exit_code == 2, result.output


# -- crash safety ------------------------------------------------------------------------------
@pytest.mark.parametrize("step", STEPS)
def test_kill_at_each_step_leaves_old_or_new_and_the_next_run_repairs(tmp_path, step):
    path = old_output(tmp_path / "out")
    proc = run_writer(path, kill_at=step)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Right after the kill: the complete old or new output, or a swap the next run completes.
    now = content(path)
    if step == "moved-old":
        assert now is None and output.pending_repair(path)
    else:
        assert now == ("old" if step in ("written", "ready") else "new")
    # The next reader or writer repairs: an interrupted swap is finished, partial work removed.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        done = repair_if_needed(path)
    assert (done is not None) == (step != "cleaned"), done
    assert [str(w.message) for w in caught] == ([f"dynoswap: {done}"] if done else [])
    if step == "moved-old":
        assert done == f"finished an interrupted replacement of {path}"
    assert content(path) == ("old" if step in ("written", "ready") else "new")
    assert leftovers(tmp_path, "out") == []
    # And a later complete write succeeds normally.
    assert run_writer(path).returncode == 0 and content(path) == "new"
    assert leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("step", STEPS)
def test_an_exception_at_each_step_is_repaired_at_once(tmp_path, monkeypatch, step):
    path = old_output(tmp_path / "out")

    def hook(name: str) -> None:
        if name == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(output, "STEP_HOOK", hook)
    with pytest.raises(KeyboardInterrupt), replace_output(path, KIND, force=True) as work:
        work.mkdir()
        (work / "content.txt").write_text("new")
    assert content(path) in ("old", "new")
    assert content(path) == ("old" if step in ("written", "ready") else "new")
    assert leftovers(tmp_path, "out") == []


def test_a_failed_write_keeps_the_old_output(tmp_path):
    path = old_output(tmp_path / "out")
    with pytest.raises(RuntimeError, match="boom"), replace_output(path, KIND, force=True) as work:
        work.mkdir()
        (work / "content.txt").write_text("half")
        raise RuntimeError("boom")
    assert content(path) == "old" and leftovers(tmp_path, "out") == []


def test_inspect_after_a_kill_between_the_renames_finds_the_model(tmp_path):
    path = tmp_path / "m"
    saver = textwrap.dedent(
        """
        import os, signal, sys
        import dynoswap
        from dynoswap.io import output
        from dynoswap.models import ModelSource

        source = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10, "widths": [8, 16]})
        gm, _ = dynoswap.convert(source.build(), (32, 32), source=source)
        dynoswap.save(gm, sys.argv[1])
        output.STEP_HOOK = lambda step: step == "moved-old" and os.kill(os.getpid(), signal.SIGKILL)
        dynoswap.save(gm, sys.argv[1])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", saver, str(path)], env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True
    )
    # The state a kill leaves between "moved-old" and "moved-new": no model at the path.
    assert proc.returncode == -signal.SIGKILL and not path.exists() and output.pending_repair(path)
    result = runner.invoke(app, ["inspect", str(path), "--json"], env=ENV)
    assert result.exit_code == 0, result.output
    assert result.stderr == f"warning: dynoswap: finished an interrupted replacement of {path}\n"
    assert path.is_dir() and leftovers(tmp_path, "m") == []


# -- one writer at a time ------------------------------------------------------------------------
def test_a_second_writer_is_refused_while_the_first_holds_the_path(tmp_path):
    path = tmp_path / "out"
    hold = str(tmp_path / "hold")
    first = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "", hold], env={**os.environ, "PYTHONPATH": ROOT}, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while not Path(hold + ".started").exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with pytest.raises(OutputLockedError, match="being written by another process"):
            with replace_output(path, KIND, force=True):
                pytest.fail("must not be reached")
        result = runner.invoke(app, ["convert", *TINY, "-o", str(path), "--force"], env=ENV)
        assert result.exit_code == 2 and "is being written by another process" in result.stderr
    finally:
        Path(hold + ".release").touch()
        assert first.wait(timeout=120) == 0
    assert content(path) == "new" and leftovers(tmp_path, "out") == ["hold.release", "hold.started"]


def test_two_concurrent_converts_exactly_one_wins(tmp_path):
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "dynoswap", "convert", *TINY, "-o", str(out)]
    env = {**os.environ, **ENV, "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "being written by another process" in loser or "already holds a dynoswap saved model" in loser
    assert dynoswap.load(out) is not None and leftovers(tmp_path, "m") == []


def test_save_reads_back_what_it_wrote(tmp_path, monkeypatch):
    from dynoswap.errors import SaveError
    from dynoswap.io import saving

    source = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10, "widths": [8, 16]})
    gm, _ = dynoswap.convert(source.build(), (32, 32), source=source)
    real_write = saving.write_saved

    def corrupting_write(model, folder):
        real_write(model, folder)
        from safetensors.torch import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        key = next(k for k in state if k.endswith("weight"))
        state[key] = state[key] + 1
        save_file(state, str(folder / "model.safetensors"))

    monkeypatch.setattr(saving, "write_saved", corrupting_write)
    with pytest.raises(SaveError, match="loads back with other values"):
        dynoswap.save(gm, tmp_path / "m")
    assert not (tmp_path / "m").exists() and leftovers(tmp_path, "") == []
    monkeypatch.undo()
    assert torch.equal(
        dynoswap.load(dynoswap.save(gm, tmp_path / "m")).state_dict()["0.weight"], gm.state_dict()["0.weight"]
    )
