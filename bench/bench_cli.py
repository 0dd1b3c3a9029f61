"""`dynoswap convert resnet50 --json` end to end, and the same minus importing torch, torchvision and timm.

Both are subprocesses timed round-robin in one run: the CLI itself, and a process that
only imports the three libraries. Their difference is what the CLI adds on top of the
libraries it cannot avoid (target: under 3 s).

In the same round-robin: a bad argument (``--weights`` naming no file) and ``inspect`` of a
saved folder, each as a ratio to the import time (target: under 0.5x; both answer before
torch is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import Row, median_times

CONVERT = [sys.executable, "-m", "dynoswap", "convert", "resnet50", "--json"]
IMPORTS = [sys.executable, "-c", "import torch, torchvision, timm"]
HELP = [sys.executable, "-m", "dynoswap", "--help"]
TARGET_S = 3.0
#: Largest ratio to the import time of a bad argument's answer and of inspecting a saved folder.
TARGET_RATIO = 0.5


def _bad_argument() -> list[str]:
    return [sys.executable, "-m", "dynoswap", "convert", "resnet50", "--weights", "no-such-checkpoint.pth"]


def _refused(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env())
    if proc.returncode != 2:
        raise RuntimeError(f"expected exit 2 from {cmd}, got {proc.returncode}: {proc.stderr}")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), check=True)
    return proc.stdout


def _in_process() -> float:
    """Median time of the convert command run through typer's test runner, libraries already imported."""
    from typer.testing import CliRunner

    from dynoswap.cli import app

    runner = CliRunner()

    def once() -> None:
        result = runner.invoke(app, ["convert", "resnet50", "--json"])
        assert result.exit_code == 0, result.output

    return median_times({"convert": once}, repeats=3, warmup=1)["convert"]


def run() -> list[Row]:
    """Time the CLI and the bare imports side by side."""
    data = json.loads(_run(CONVERT))  # also checks stdout is exactly one JSON object
    with tempfile.TemporaryDirectory() as tmp:
        saved = str(Path(tmp) / "r50")
        _run([*CONVERT[:-1], "-o", saved])
        inspect = [sys.executable, "-m", "dynoswap", "inspect", saved, "--json"]
        times = median_times(
            {
                "convert": lambda: _run(CONVERT),
                "imports": lambda: _run(IMPORTS),
                "help": lambda: _run(HELP),
                "bad": lambda: _refused(_bad_argument()),
                "inspect": lambda: _run(inspect),
            },
            repeats=5,
            warmup=1,
        )
    own = times["convert"] - times["imports"]
    in_process = _in_process()
    bad, inspected = times["bad"] / times["imports"], times["inspect"] / times["imports"]
    return [
        Row("cli", "bad argument answered / imports", bad, "x", f"< {TARGET_RATIO:g}x", bad < TARGET_RATIO),
        Row(
            "cli",
            "inspect a saved folder (resnet50) / imports",
            inspected,
            "x",
            f"< {TARGET_RATIO:g}x",
            inspected < TARGET_RATIO,
        ),
        Row("cli", "bad argument answered, end to end", times["bad"], "s"),
        Row("cli", "inspect a saved folder, end to end", times["inspect"], "s"),
        Row("cli", "convert resnet50 --json, end to end", times["convert"], "s"),
        Row("cli", "import torch+torchvision+timm", times["imports"], "s"),
        Row("cli", "convert resnet50 --json minus imports", own, "s", f"< {TARGET_S:g} s", own < TARGET_S),
        Row(
            "cli",
            "convert resnet50 --json, in process (imports done)",
            in_process,
            "s",
            f"< {TARGET_S:g} s",
            in_process < TARGET_S,
        ),
        Row("cli", "dynoswap --help, end to end", times["help"], "s"),
        Row(
            "cli", "resnet50 GMACs before -> after (post, init)", data["after"]["gmacs"] / data["before"]["gmacs"], "x"
        ),
    ]
