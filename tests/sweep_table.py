"""The sweep's pinned outcomes, and docs/compatibility.md generated from them.

``tests/data/sweep_expected.json`` holds one entry per swept model: how it ended in the last full
sweep (``converted`` with its DynOPool, alpha, resized-upsampling and minimum-size-limit counts and
the size it was checked at, or ``refused`` with its category) and what the page shows about it.
``tests/test_engine_sweep.py`` checks every model against its entry (:func:`check_pinned`), so a
model that converts today and regresses to a refusal, or converts with other replacements, fails
the sweep; docs/compatibility.md is rendered from the same file (:func:`render_page`) and a fast
test checks that the page on disk is that rendering.

Changing an outcome is a reviewed change of the JSON file: run the sweep writer (see
:mod:`tests.test_engine_sweep`), read the diff, commit both files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.sweep_models import timm_families, torchvision_classifiers, torchvision_segmenters

EXPECTED_FILE = Path(__file__).parent / "data" / "sweep_expected.json"
PAGE = Path(__file__).parents[1] / "docs" / "compatibility.md"
MARKER = "<!-- table -->"

TORCHVISION = "torchvision"
SEGMENTATION = "torchvision segmentation (placement='pre')"

#: Refusal categories a model may end in (anything else is a crash).
CATEGORIES = (
    "fixed position embedding",
    "fixed window partition",
    "fixed-size head",
    "fixed input size",
    "other dimension",
    "untieable merge",
    "breaks when scales move",
    "untraceable",
    "fails at the input size",
)
#: Families without a fixed-size position embedding or window partition count towards the >= 97% target.
NOT_CNN = ("fixed position embedding", "fixed window partition", "fixed input size", "other dimension")

#: What a pinned entry fixes: how the model ends and, when it converts, what was replaced and where it was checked.
PINNED = ("status", "category", "dynopools", "alphas", "resized", "limits", "checked", "size")
#: Outcomes of a conversion that ran (``nothing to convert`` included): their counts are kept.
RAN = ("converted", "nothing to convert")


def planned() -> list[tuple[str, str]]:
    """Every swept model as (library label, name), in the page's order."""
    plan = [(TORCHVISION, n) for n in torchvision_classifiers()]
    plan += [(SEGMENTATION, n) for n in torchvision_segmenters()]
    families = timm_families()
    plan += [(f"timm ({fam})", f["model"]) for fam, f in sorted(families.items()) if f["conv2d_or_pool2d"]]
    return plan


def load_table(path: Path = EXPECTED_FILE) -> dict[str, Any]:
    """The pinned table: ``{"seconds", "planned", "rerun", "models": [entry, ...]}``."""
    return json.loads(path.read_text())


def write_table(table: dict[str, Any], path: Path = EXPECTED_FILE) -> None:
    """Write the pinned table (one entry per line block, stable key order)."""
    path.write_text(json.dumps(table, indent=1) + "\n")


def pinned(table: dict[str, Any] | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Pinned entries by (library label, name)."""
    table = load_table() if table is None else table
    return {(e["library"], e["model"]): e for e in table["models"]}


def entry_of(library: str, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """The table entry of one sweep outcome: what is pinned and what the page shows."""
    entry: dict[str, Any] = {"library": library, "model": name, "status": result["status"]}
    if result["status"] in RAN:
        entry.update({k: result[k] for k in ("dynopools", "alphas", "resized", "limits", "checked")})
        if result["checked"]:
            entry.update(size=result["size"], at_minimum=result.get("at_minimum", 0))
    elif result["status"] == "refused":
        entry.update(category=result["category"], reason=result["reason"])
    else:
        entry["reason"] = result["reason"]
    return entry


def check_pinned(library: str, name: str, result: dict[str, Any], table: dict[str, Any] | None = None) -> None:
    """Assert that a sweep outcome is the pinned one (a crash, a regression or a new refusal fails).

    A model pinned as ``timeout`` (no outcome within the page's per-model limit) must end in a named
    outcome without crashing; pin its outcome once a full sweep records one.
    """
    expected = pinned(table).get((library, name))
    assert expected is not None, (
        f"{library} {name} has no pinned outcome in {EXPECTED_FILE.name}: run the sweep writer and review the entry"
    )
    assert result["status"] != "crash", result
    if result["status"] == "refused":
        assert result["category"] in CATEGORIES, result
    if expected["status"] == "timeout":
        assert result["status"] in (*RAN, "refused"), result
        return
    got = {k: result.get(k) for k in PINNED if k in expected}
    want = {k: expected[k] for k in PINNED if k in expected}
    assert got == want, f"{library} {name}: pinned {want}, now {got} {result.get('reason') or ''}".strip()


def row(entry: dict[str, Any]) -> str:
    """One row of the page's table."""
    if entry["status"] == "converted":
        detail = f"{entry['dynopools']} DynOPool, {entry['alphas']} alpha"
        if entry["resized"]:
            detail += f", {entry['resized']} upsampling resized to partner"
        if entry["limits"]:
            detail += f", {entry['limits']} minimum-size limit"
        if entry["checked"]:
            detail += f"; checked at {entry['size']}x{entry['size']}"
            if entry.get("at_minimum"):
                detail += f" ({entry['at_minimum']} group at the 2-pixel minimum)"
        else:
            detail += " (converted on the meta device only: too large for the CPU test budget)"
        status = "converted"
    elif entry["status"] == "refused":
        status, detail = f"refused: {entry['category']}", entry["reason"]
    else:
        status, detail = entry["status"], entry.get("reason", "")
    detail = detail.replace("|", "\\|").replace("\n", " ")
    return f"| {entry['library']} | `{entry['model']}` | {status} | {detail} |"


def _outcome(entry: dict[str, Any]) -> str:
    return f"refused: {entry['category']}" if entry["status"] == "refused" else entry["status"]


def summary(table: dict[str, Any], families: dict[str, Any] | None = None) -> dict[str, Any]:
    """The page's counts, computed from the entries."""
    families = timm_families() if families is None else families
    counts: dict[str, int] = {}
    for entry in table["models"]:
        counts[_outcome(entry)] = counts.get(_outcome(entry), 0) + 1
    timm = [e for e in table["models"] if e["library"].startswith("timm")]
    cnn = [e for e in timm if e.get("category") not in NOT_CNN]
    converted = sum(e["status"] == "converted" for e in cnn)
    return {
        "models": len(table["models"]),
        "counts": counts,
        "families": len(families),
        "timm_swept": len(timm),
        "timm_cnn": len(cnn),
        "timm_cnn_converted": converted,
        "timm_cnn_percent": 100 * converted / max(len(cnn), 1),
    }


def render_table(table: dict[str, Any], families: dict[str, Any] | None = None) -> str:
    """The page's part below the marker: counts, then one row per model."""
    s = summary(table, families)
    note = f"Sweep of {s['models']} of {table['planned']} models in {table['seconds']:.0f} s (1 thread)"
    if table.get("rerun"):
        note += " (rerun on their own since: " + ", ".join(table["rerun"]) + ")"
    lines = [
        f"{note}: " + ", ".join(f"{v} {k}" for k, v in sorted(s["counts"].items())) + ".",
        f"timm: {s['families']} families, {s['timm_swept']} with a 2-D conv or pool swept; of the {s['timm_cnn']} "
        f"without a fixed input size, position embedding or window partition, {s['timm_cnn_converted']} convert "
        f"({s['timm_cnn_percent']:.1f}%).",
    ]
    rows = "\n".join(row(e) for e in table["models"])
    return "\n\n".join(lines) + "\n\n| library | model | outcome | details |\n|---|---|---|---|\n" + rows + "\n"


def render_page(table: dict[str, Any], page: Path = PAGE) -> str:
    """docs/compatibility.md: its hand-written head, then the table rendered from the pinned entries."""
    head = page.read_text().split(MARKER)[0] if page.exists() else "# Compatibility\n\n"
    return head + MARKER + "\n\n" + render_table(table)


def write_page(table: dict[str, Any] | None = None, page: Path = PAGE) -> None:
    """Render docs/compatibility.md from the pinned table."""
    page.write_text(render_page(load_table() if table is None else table, page))


if __name__ == "__main__":
    write_page()
