"""`dynoswap convert resnet50 --json` end to end, and the same minus importing torch, torchvision and timm.

Both are subprocesses timed round-robin in one run: the CLI itself, and a process that
only imports the three libraries. Their difference is what the CLI adds on top of the
libraries it cannot avoid (target: under 3 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from bench.common import Row, median_times

CONVERT = [sys.executable, "-m", "dynoswap", "convert", "resnet50", "--json"]
IMPORTS = [sys.executable, "-c", "import torch, torchvision, timm"]
HELP = [sys.executable, "-m", "dynoswap", "--help"]
TARGET_S = 3.0


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
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
    times = median_times(
        {"convert": lambda: _run(CONVERT), "imports": lambda: _run(IMPORTS), "help": lambda: _run(HELP)},
        repeats=5,
        warmup=1,
    )
    own = times["convert"] - times["imports"]
    in_process = _in_process()
    return [
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
