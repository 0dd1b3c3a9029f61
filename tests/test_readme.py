"""The README runs: every Python and shell block of README.md is executed, and every output it shows is
compared with what the code prints. No figure in a block is typed by hand.

Conventions in README.md (kept few; each tag says why it is there):

- A ```python block runs top to bottom in a fresh namespace, in a fresh temporary folder, so it must
  define everything it uses. A statement ``print(...)  # OUTPUT`` must print exactly OUTPUT, where
  ``...`` matches anything; every ``print`` of a block shows its output that way.
- A ```bash block runs as one ``bash -euo pipefail`` script in a fresh temporary folder, with this
  checkout's ``dynoswap`` and ``python`` first on the PATH and no ``COLUMNS`` (piped output). Files the
  README takes as given (``ckpt.pth``, ``out/r18-trained``) are made first by :data:`FIXTURES`.
- A plain ``` block tagged ``<!-- readme-test: output -->`` is what the block above it prints: its
  lines must appear in that order in the output (a line ``...`` skips any number of lines, ``...``
  inside a line matches anything).
- A ```python block whose first line is a comment naming a file (``# mypkg/models.py: ...``) is that
  file: it is written into the folder of every later Python block of its section, which can import it.
- ``<!-- readme-test: skip REASON -->`` before a block: not run, for the reason given.

A block that builds a full-size model (resnet50 and the like, at 224x224) or trains without ``--max-steps``
is marked ``slow``; the others run in every ``make test-fast``.
"""

from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
TAG = re.compile(r"<!--\s*readme-test:\s*(\w+)\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
ELLIPSIS = "..."
FILE_BLOCK = re.compile(r"#\s*([\w./-]+\.py):")


@dataclass
class Block:
    """One fenced block of the README."""

    lang: str
    code: str
    line: int  #: line number of the opening fence
    section: str  #: the heading above it
    tag: str = ""  #: ``skip`` or ``output`` (from the comment line right above the fence)
    reason: str = ""
    output: Block | None = None  #: the tagged output block that follows it
    index: int = 1  #: its place among the blocks of its section, from 1

    @property
    def file(self) -> str | None:
        """The path a block stands for (its first line ``# path/to/module.py: ...``), or None."""
        m = FILE_BLOCK.match(self.code)
        return m.group(1) if m and self.lang == "python" else None

    @property
    def id(self) -> str:
        """A test id that survives edits elsewhere in the README: the section and the block's place in it."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.section.lower()).strip("-")[:40]
        return f"{slug}-{self.index}"


def parse_blocks(text: str) -> list[Block]:
    """Every fenced block of a README text, each tagged output block attached to the block above it."""
    blocks: list[Block] = []
    lines = text.splitlines()
    section, tag, reason, i = "", "", "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        if m := TAG.fullmatch(line.strip()):
            tag, reason = m.group(1), m.group(2)
            i += 1
            continue
        if m := FENCE.match(line):
            start, body = i, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            block = Block(m.group(1), "\n".join(body) + "\n", start + 1, section, tag, reason)
            if tag == "output":
                assert blocks, f"README line {start + 1}: an output block must follow the block that prints it"
                blocks[-1].output = block
            else:
                block.index = 1 + sum(b.section == section for b in blocks)
                blocks.append(block)
            tag = reason = ""
        elif line.strip():
            tag = reason = ""  # a tag belongs to the block right below it
        i += 1
    return blocks


BLOCKS = parse_blocks(README.read_text())


# -- comparing outputs --------------------------------------------------------------------
def _pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*?".join(re.escape(part) for part in expected.split(ELLIPSIS)), re.DOTALL)


def check_printed(expected: str, printed: str, where: str) -> None:
    """``printed`` (one statement's output) must be ``expected``, ``...`` matching anything."""
    got = printed.rstrip("\n")
    assert _pattern(expected).fullmatch(got), f"{where}: the README shows {expected!r}, the code prints {got!r}"


def check_lines(expected: str, printed: str, where: str) -> None:
    """The lines of ``expected`` appear in ``printed`` in order; a line ``...`` skips any number of lines."""
    got = printed.splitlines()
    at = 0
    skipping = False
    for want in expected.splitlines():
        if want.strip() == ELLIPSIS:
            skipping = True
            continue
        pattern = _pattern(want.rstrip())
        for j in range(at, len(got) if skipping else min(at + 1, len(got))):
            if pattern.fullmatch(got[j].rstrip()):
                at, skipping = j + 1, False
                break
        else:
            shown = "\n".join(got[max(at - 2, 0) : at + 8])
            raise AssertionError(f"{where}: the README shows the line {want!r}; the output has, from there:\n{shown}")


# -- running Python blocks ----------------------------------------------------------------
def _comments(code: str) -> dict[int, str]:
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string[1:].strip()
    return found


def _is_print(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "print"
    )


def run_python(block: Block) -> None:
    """Run a Python block statement by statement; each ``print(...)  # OUTPUT`` must print OUTPUT."""
    tree = ast.parse(block.code)
    comments = _comments(block.code)
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for node in tree.body:
        expected = comments.get(node.end_lineno or node.lineno) if _is_print(node) else None
        where = f"README line {block.line + node.lineno}"
        assert not _is_print(node) or expected, f"{where}: a print without the output it gives (# OUTPUT)"
        code = compile(ast.Module([node], type_ignores=[]), f"README.md:{block.line + node.lineno}", "exec")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
        if expected is not None:
            check_printed(expected, printed.getvalue(), where)


# -- running shell blocks -----------------------------------------------------------------
def _checkpoint(path: Path) -> None:
    import torch
    import torchvision

    torch.save(torchvision.models.resnet50().state_dict(), path)


def _trained_resnet18(path: Path) -> None:
    import torch

    import dynoswap
    from dynoswap.models import ModelSource

    source = ModelSource("torchvision", "resnet18", {})
    gm, _ = dynoswap.convert(source.build(), input_size=(224, 224), source=source)
    with torch.no_grad():  # a "trained" model: scales moved off their start
        for group, pool in enumerate(m for m in gm.modules() if isinstance(m, dynoswap.DynOPool2d) and m.leader is m):
            pool.set_scale((0.6 - 0.05 * group, 0.5))
    dynoswap.save(gm, path)


#: Files the README's commands take as given, made in the block's folder when the block names them.
FIXTURES: dict[str, Callable[[Path], None]] = {
    "ckpt.pth": _checkpoint,  # "carry a trained checkpoint over": torchvision's resnet50 weights
    "out/r18-trained": _trained_resnet18,  # a trained resnet18, saved
}


_OUTPUTS: dict[str, str] = {}  # what each shell block printed, by its code: one run per session


def run_shell(block: Block, folder: Path) -> str:
    """Run a bash block as one script in ``folder``; return stdout and stderr together."""
    if block.code in _OUTPUTS:
        return _OUTPUTS[block.code]
    for name, make in FIXTURES.items():
        if name in block.code:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            make(folder / name)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
        NO_COLOR="1",
        TERM="dumb",
    )
    script = "set -euo pipefail\n" + block.code
    done = subprocess.run(
        ["bash", "-c", script], cwd=folder, env=env, capture_output=True, text=True, timeout=1200, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"README line {block.line}: exit {done.returncode}\n{output[-3000:]}"
    _OUTPUTS[block.code] = output
    return output


def _needs(block: Block) -> list[str]:
    return [tool for tool in ("jq",) if re.search(rf"\b{tool}\b", block.code) and shutil.which(tool) is None]


def _slow(block: Block) -> bool:
    """Slow: a full-size model (not vgg-tiny, a model of its own or the layer alone), or training without a step cap."""
    small = re.search(r"vgg-tiny|small_vgg|mypkg|DynOPool2d\(", block.code)
    return not small or ("dynoswap train" in block.code and "--max-steps" not in block.code)


def _params(langs: tuple[str, ...]) -> list[object]:
    return [
        pytest.param(b, id=b.id, marks=[pytest.mark.slow] if _slow(b) else [])
        for b in BLOCKS
        if b.lang in langs and b.tag != "skip" and b.file is None
    ]


def write_files(block: Block, folder: Path) -> list[str]:
    """Write the file blocks of ``block``'s section above it into ``folder``; return their top-level names."""
    names = []
    for other in BLOCKS:
        if other.file and other.section == block.section and other.line < block.line:
            path = folder / other.file
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(other.code)
            names.append(Path(other.file).parts[0].removesuffix(".py"))
    return names


@pytest.mark.parametrize("block", _params(("python",)))
def test_readme_python_block(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    names = write_files(block, tmp_path)
    try:
        run_python(block)
    finally:  # the next test's files are other files
        for module in [m for m in sys.modules if m.split(".")[0] in names]:
            del sys.modules[module]


@pytest.mark.parametrize("block", _params(("bash", "sh", "console")))
def test_readme_shell_block(block: Block, tmp_path: Path) -> None:
    missing = _needs(block)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    output = run_shell(block, tmp_path)
    if block.output is not None:
        check_lines(block.output.code, output, f"README line {block.output.line}")


def test_every_block_is_run_or_says_why_not() -> None:
    for block in BLOCKS:
        if block.file:
            assert any(b.file is None and b.section == block.section and b.line > block.line for b in BLOCKS), (
                f"README line {block.line}: no later block of its section uses {block.file}"
            )
        if block.tag == "skip":
            assert block.reason, f"README line {block.line}: a skipped block says why"
        else:
            assert block.tag == "", f"README line {block.line}: unknown tag {block.tag!r}"
            assert block.lang in ("python", "bash", "sh", "console"), (
                f"README line {block.line}: a ```{block.lang} block is neither run nor tagged "
                "(<!-- readme-test: output --> after the block that prints it, or skip REASON)"
            )
    skipped = [b for b in BLOCKS if b.tag == "skip"]
    assert len(skipped) <= len(BLOCKS) // 3, "tags are for the rare block that cannot run here"


# -- the check fails when the README is edited ---------------------------------------------
def _layer_block(text: str) -> Block:
    return next(b for b in parse_blocks(text) if b.lang == "python" and "pool.set_scale" in b.code)


def test_an_edited_python_output_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = README.read_text()
    run_python(_layer_block(text))  # as written, it passes
    edited = re.sub(r"(print\(pool\.scale\) +# )\(0\.6, 0\.45\)", r"\1(0.6, 0.46)", text)
    assert edited != text, "the README's layer example moved: update this test"
    with pytest.raises(AssertionError, match=r"the README shows '\(0.6, 0.46\)', the code prints '\(0.6, 0.45\)'"):
        run_python(_layer_block(edited))


def test_a_print_without_its_output_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    edited = re.sub(r"(print\(pool\.scale\)) +# \(0\.6, 0\.45\)", r"\1", README.read_text())
    assert "print(pool.scale)\n" in edited
    with pytest.raises(AssertionError, match="a print without the output it gives"):
        run_python(_layer_block(edited))


def test_an_edited_command_output_fails_the_check(tmp_path):
    block = next(b for b in BLOCKS if b.output is not None and "--target-gmacs" in b.code)
    assert block.output is not None
    printed = run_shell(block, tmp_path)  # the real run (shared with its own test above)
    check_lines(block.output.code, printed, "as written")
    for old, new in (("+0.7%", "-0.7%"), ("sizes 12x17", "sizes 12x16"), ("0.4010", "0.0285")):
        assert old in block.output.code, f"the README's budget example moved: update this test ({old})"
        edited = parse_blocks(README.read_text().replace(block.output.code, block.output.code.replace(old, new)))
        again = next(b for b in edited if b.output is not None and "--target-gmacs" in b.code)
        assert again.output is not None and new in again.output.code
        with pytest.raises(AssertionError, match="the README shows the line"):
            check_lines(again.output.code, printed, "edited")


def test_lines_are_matched_in_order_and_ellipsis_lines_skip():
    check_lines("a\n...\nc ... e\n", "a\nb\nc d e\n", "t")
    with pytest.raises(AssertionError):
        check_lines("a\nc\n", "a\nb\nc\n", "t")  # without "...", lines follow one another
    with pytest.raises(AssertionError):
        check_lines("c\n...\na\n", "a\nb\nc\n", "t")  # in order


# -- help texts, the code and the README agree on defaults ----------------------------------
README_DEFAULTS = (
    # "`--input-size H W` (default 224 224; ...)", "`--alpha-lr` is ... (default 0.02)"
    re.compile(r"`(--[a-z-]+)[^`]*`[^`(]{0,80}\(default ([^;)]+)", re.DOTALL),
    # "(`--warmup 0.1`)", "(until `--search-end 0.5`)": a flag with the value it has unless given
    re.compile(r"\((?:until )?`(--[a-z-]+) ([\w.]+)`\)"),
    # "`--compile` is off by default"
    re.compile(r"`(--[a-z-]+)` is (off|on) by default"),
)
HELP_DEFAULT = re.compile(r"default:? ([^;)]+?)(?: or the preset's)?(?:[;)]|\.(?:\s|$))")


def _commands() -> dict[str, object]:
    import typer.main

    from dynoswap.cli import app

    def walk(cmd, path):
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                yield from walk(sub, [*path, name])
        else:
            yield " ".join(path), cmd

    return dict(walk(typer.main.get_command(app), []))


def _options(name: str, cmd) -> dict[str, tuple[object, str]]:
    """Each option of a command: its effective default (None when only the help says it) and its help."""
    from dynoswap.cli.train import DEFAULTS

    found = {}
    for param in cmd.params:
        if not getattr(param, "opts", None) or not param.opts[0].startswith("--"):
            continue
        default = param.default
        field = param.opts[0][2:].replace("-", "_")
        if default is None and name == "train" and hasattr(DEFAULTS, field):
            default = getattr(DEFAULTS, field)  # the hyperparameter a preset or the flag overrides
        found[param.opts[0]] = (default, getattr(param, "help", None) or "")
    return found


def _agrees(stated: str, default: object, help_text: str) -> bool:
    stated = stated.strip()
    if isinstance(default, bool):
        return stated in (("on", "true") if default else ("off", "false", "warn"))
    if isinstance(default, (int, float)):
        try:
            return float(stated) == float(default)
        except ValueError:
            return False
    if isinstance(default, (tuple, list)):
        return stated == " ".join(str(v) for v in default)
    said = HELP_DEFAULT.search(help_text)  # no default in the code: the help says it in words
    return bool(said) and stated in said.group(1)


SCOPE = re.compile(r"^\*\*`(\w+)` options|^#+ [^\n]*?(?:`dynoswap (\w+)`)?[^\n]*$", re.MULTILINE)


def _scope(readme: str, at: int) -> str | None:
    """The command a README statement is about: the last "**`convert` options:**" or heading above it."""
    last = None
    for marker in SCOPE.finditer(readme, 0, at):
        last = marker.group(1) or marker.group(2)
    return last


def check_defaults(readme: str) -> list[str]:
    """Every default the README states equals what the CLI's help and code say; return the disagreements."""
    commands = {name: _options(name, cmd) for name, cmd in _commands().items()}
    problems, stated_any = [], 0
    for pattern in README_DEFAULTS:
        for match in pattern.finditer(readme):
            flag, stated = match.group(1), " ".join(match.group(2).split())
            scope = _scope(readme, match.start())
            having = {n: opts[flag] for n, opts in commands.items() if flag in opts and scope in (None, n)}
            if not having:
                problems.append(f"README states a default for {flag}, which no command has")
                continue
            stated_any += 1
            for name, (default, help_text) in having.items():
                if not _agrees(stated, default, help_text):
                    said = f"`{name} --help`/code: {default!r} {help_text!r}"
                    problems.append(f"README: {flag} defaults to {stated!r}; {said}")
    if stated_any < 5:  # --input-size, --alpha-lr, --max-alpha-step, --warmup, --search-end, --compile
        problems.append(f"only {stated_any} defaults found in the README: the patterns of this test are out of date")
    return problems


def test_the_readme_states_the_defaults_the_cli_has():
    assert check_defaults(README.read_text()) == []


def test_help_texts_state_the_defaults_the_code_uses():
    checked = 0
    for name, cmd in _commands().items():
        for flag, (default, help_text) in _options(name, cmd).items():
            said = HELP_DEFAULT.search(help_text)
            if said is None or default is None or isinstance(default, bool):
                continue
            number = re.match(r"-?[\d.]+(?:e-?\d+)?", said.group(1))
            if number is None:
                continue
            checked += 1
            assert float(number.group()) == float(default), f"`{name} --help` {flag}: {help_text!r}; code: {default!r}"
    assert checked >= 5


def test_an_edited_default_in_the_readme_fails_the_check():
    text = README.read_text()
    for old, new in (("(default 0.015", "(default 0.03"), ("(`--warmup 0.1`)", "(`--warmup 0.2`)")):
        assert old in text, f"the README moved {old}: update this test"
        problems = check_defaults(text.replace(old, new, 1))
        assert len(problems) == 1 and new.strip("()`").split()[-1].rstrip(")") in problems[0], problems


# -- the experiment's table in the README is the one docs/experiment/tradeoff.md holds ------
EXPERIMENT = ROOT / "docs" / "experiment" / "tradeoff.md"
EXPERIMENT_SECTION = "### Accuracy against real cost: three designs at equal cost"


def _normal(cell: str) -> str:
    return " ".join(cell.replace("**", "").replace("±", "+-").replace("×", "x").split())


def _rows(text: str, head: str) -> list[list[str]]:
    """The cells of the first Markdown table whose header starts with ``head``."""
    rows = []
    for line in text[text.index(head) :].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([_normal(c) for c in line.strip().strip("|").split("|")])
    return rows


def experiment_table_problems(readme: str, experiment: str) -> list[str]:
    """Compare the README's experiment table, cell by cell, with the rows of tradeoff.md it is made of."""
    section = readme[readme.index(EXPERIMENT_SECTION) :]
    shown = _rows(section, "| budget, GMACs (factor) |")
    source = {(r[0], r[1]): r for r in _rows(experiment, "| budget GMACs (factor) | design |")}
    problems = []
    for budget, human, symmetric, dynopool, sizes in shown:
        want = {
            "human": f"{source[(budget, 'human')][3]} ({source[(budget, 'human')][2]})",
            "symmetric": source[(budget, "symmetric")][3],
            "dynopool": source[(budget, "dynopool")][3],
            "sizes": source[(budget, "dynopool")][6],
        }
        for name, got in (("human", human), ("symmetric", symmetric), ("dynopool", dynopool), ("sizes", sizes)):
            if got != want[name]:
                problems.append(f"budget {budget}, {name}: README {got!r}, tradeoff.md {want[name]!r}")
    if len(shown) != len({b for b, _ in source}):
        problems.append(f"README shows {len(shown)} budgets, tradeoff.md has {len({b for b, _ in source})}")
    return problems


def test_the_readme_experiment_table_is_tradeoff_md():
    assert experiment_table_problems(README.read_text(), EXPERIMENT.read_text()) == []


def test_an_edited_experiment_figure_fails_the_check():
    readme = README.read_text()
    old = "| **0.823 ± 0.012** |"
    assert old in readme, "the README's experiment table moved: update this test"
    problems = experiment_table_problems(readme.replace(old, "| **0.824 ± 0.012** |", 1), EXPERIMENT.read_text())
    assert problems == ["budget 0.00089 (0.5), symmetric: README '0.824 +- 0.012', tradeoff.md '0.823 +- 0.012'"]
