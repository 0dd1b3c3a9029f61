"""ConversionReport: what was replaced, by which rule, what was left alone and why."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..display import DYNOPOOL_SUFFIX
from ..errors import ConversionError  # noqa: F401  (re-exported: the engine's error type)

if TYPE_CHECKING:
    from rich.table import Table

CONVERTED = "converted"
NOTHING = "nothing to convert"


@dataclass
class Replacement:
    """One DynOPool and the resizers it replaced.

    Attributes:
        name: Node (module path) of the primary resizer.
        was: What it was: ``{"op", "stride", "kernel"}``.
        rule: Rule applied (``pool``, ``conv_post``, ``conv_pre``, ``patchify_post``, ...).
        dynopool: Module path of the DynOPool.
        init_scale: (r_h, r_w) at conversion.
        group: Tie group number, from 1 in execution order (``groups[group - 1]``; a group shares one alpha).
        merged: Resizers merged into this DynOPool (removed), with what they were.
        cost_note: Extra cost of the rule, if any (e.g. a conv now runs at stride 1).
        original_out: (h, w) the replaced resizers produced in the original model at the
            conversion's input size (the last merged one's output): the model's stage before.
        note: Why the initial scale is not 1/stride (e.g. ``ceil_mode: init alpha 2.0167``), if so.
    """

    name: str
    was: dict[str, Any]
    rule: str
    dynopool: str
    init_scale: tuple[float, ...]
    group: int
    merged: list[dict[str, Any]] = field(default_factory=list)
    cost_note: str = ""
    original_out: tuple[int, ...] | None = None
    note: str = ""


@dataclass
class Skipped:
    """A resizing op left unchanged."""

    name: str
    op: str
    reason: str


def _once(values: Sequence[Any]) -> str:
    """One value when every axis has it, else one per axis: ``2``, ``1x2x2``."""
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _describe(was: dict[str, Any]) -> str:
    """``MaxPool2d 3x3/2 pad 1 ceil``: op, kernel, stride, then padding and ceil_mode where set."""
    text = f"{was['op']} {'x'.join(map(str, was['kernel']))}/{_once(was['stride'])}"
    padding = was.get("padding", [0, 0])
    if isinstance(padding, str):
        text += f" pad {padding}"
    elif any(padding):
        text += f" pad {_once(padding)}"
    if was.get("ceil_mode"):
        text += " ceil"
    return text


@dataclass
class ConversionReport:
    """Outcome of :func:`dynoswap.convert`.

    Attributes:
        model: Name of the converted model.
        input_size: The conversion's input size: (L,), (H, W) or (T, H, W).
        placement: ``post`` or ``pre``.
        replacements: One row per DynOPool.
        skipped: Resizing ops left unchanged, with the reason.
        groups: DynOPool names per tie group (one alpha each).
        resized_to_partner: Fixed-factor upsamplings that now take their partner's size.
        adapted_heads: Layers behind which ``head="adapt"`` inserted an adaptive pool.
        global_pools: Fixed-kernel average pools that covered their whole input at conversion (S3D's 2x7x7),
            made adaptive so they keep averaging the whole map when sizes change.
        limits: Ops that need their input at least as large as at conversion, and what that means.
        submodule: Path of the converted part when one submodule was converted in place (its input
            size is ``input_size``); None for a whole model.
    """

    model: str
    input_size: tuple[int, ...]
    placement: str
    replacements: list[Replacement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    resized_to_partner: list[str] = field(default_factory=list)
    adapted_heads: list[str] = field(default_factory=list)
    global_pools: list[str] = field(default_factory=list)
    limits: dict[str, str] = field(default_factory=dict)
    submodule: str | None = None

    @property
    def status(self) -> str:
        """``converted`` or ``nothing to convert``."""
        return CONVERTED if self.replacements else NOTHING

    @property
    def num_dynopools(self) -> int:
        """DynOPool layers inserted."""
        return len(self.replacements)

    @property
    def num_alphas(self) -> int:
        """Learnable alphas after tying (one per group)."""
        return len(self.groups)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        data = asdict(self)
        data["status"] = self.status
        data["input_size"] = list(self.input_size)
        if self.submodule is None:
            del data["submodule"]  # a whole-model report reads as it always did
        for rep in data["replacements"]:
            rep["init_scale"] = list(rep["init_scale"])
            rep["original_out"] = list(rep["original_out"]) if rep["original_out"] else None
        return data

    def table(self) -> Table:
        """Build a rich table: one row per DynOPool, then the skipped resizers.

        Long names are shortened in the middle where the console is narrow (never at the end);
        a rule that makes a conv cost more says so under the table (the report's cost notes).
        """
        from rich import box
        from rich.table import Table
        from rich.text import Text

        from ..display import MIN_NAME_WIDTH, Name

        part = f" {self.submodule} ({'x'.join(map(str, self.input_size))} input)" if self.submodule else ""
        title = f"{self.model}{part}: {self.num_dynopools} DynOPool, {self.num_alphas} alpha ({self.placement})"
        # A DynOPool is named after its node; the column appears only when some name says more.
        named = any(rep.dynopool != f"{rep.name}{DYNOPOOL_SUFFIX}" for rep in self.replacements)
        notes = {rep.rule: rep.cost_note for rep in self.replacements if rep.cost_note}
        caption = [f"{rule}: {note}" for rule, note in notes.items()]
        if self.replacements and not named:
            caption.insert(0, f"each DynOPool is named after its node: NODE{DYNOPOOL_SUFFIX}")
        table = Table(title=title, caption="\n".join(caption) or None, caption_justify="left", box=box.SIMPLE_HEAD)
        longest = {
            "node": max([len(r.name) for r in self.replacements] + [len(k.name) for k in self.skipped], default=4),
            "dynopool": max((len(r.dynopool) for r in self.replacements), default=8),
        }
        table.add_column("node", min_width=min(longest["node"], MIN_NAME_WIDTH + 2))
        table.add_column("was", no_wrap=True)
        table.add_column("rule", overflow="fold")
        if named:
            table.add_column("dynopool", min_width=min(longest["dynopool"], MIN_NAME_WIDTH + len(DYNOPOOL_SUFFIX)))
        table.add_column("scale", no_wrap=True)
        table.add_column("group", justify="right", no_wrap=True)
        table.add_column("note", overflow="fold")
        for rep in self.replacements:
            notes_of = ["merged " + ", ".join(m["name"] for m in rep.merged)] if rep.merged else []
            note = "; ".join([*notes_of, *([rep.note] if rep.note else [])])
            scales = [f"{r:.4g}" for r in rep.init_scale]
            scale = scales[0] if len(set(scales)) == 1 else "x".join(scales)
            dynopool = [Name(rep.dynopool, suffix=DYNOPOOL_SUFFIX)] if named else []
            table.add_row(Name(rep.name), _describe(rep.was), rep.rule, *dynopool, scale, str(rep.group), Text(note))
        for skip in self.skipped:
            table.add_row(Name(skip.name), skip.op, "kept", *([""] if named else []), "", "", Text(skip.reason))
        return table

    def __str__(self) -> str:
        name = f"{self.model} {self.submodule}" if self.submodule else self.model
        return f"ConversionReport({name}: {self.status}, {self.num_dynopools} DynOPool, {self.num_alphas} alpha)"
