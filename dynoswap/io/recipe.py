"""The recipe of a converted model: one typed ``Recipe``, its JSON document, and the saved-folder layout.

A saved model is a folder holding :data:`RECIPE_FILE` (this document) and
:data:`WEIGHTS_FILE` (safetensors). The document is validated field by field when
read: an unknown format version, a missing or mistyped field is one
:class:`~dynoswap.errors.RecipeError` naming the file and the field. Reading a recipe
never imports or calls anything; what its source or leaf modules would run is
checked by :func:`dynoswap.sources.check_source` and :func:`resolve_leaf` first.

Format versions: 1 is the converted model; 2 is a frozen model (version 1 plus its
``frozen`` section, see :func:`dynoswap.freeze`). Each version registers its reader in
:data:`READERS`; a reader sees the raw mapping and returns a ``Recipe``.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DynoswapError, RecipeError, UntrustedCodeError
from ..sources import LIBRARIES, ModelSource
from ..validate import MAX_INPUT_SIDE, MAX_UPSAMPLE, check_input_budget, check_submodule_path
from .bounded import MAX_JSON_BYTES, loads_json, read_capped
from .output import register_output_kind

if TYPE_CHECKING:
    from torch import nn

RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "dynoswap-saved-model"
FORMAT_VERSION = 1
#: Format version of a saved frozen model (a version-1 recipe plus its ``frozen`` section).
FROZEN_FORMAT_VERSION = 2
#: Key of the recipe dict in a converted GraphModule's ``meta``.
RECIPE_KEY = "dynoswap"
PLACEMENTS = ("post", "pre")
PATCHIFY = ("post", "skip")
#: What convert(head=...) accepts: keep a fixed-size head ("none") or pool to its size before it ("adapt").
HEADS = ("none", "adapt")
#: What convert(anchors=...) accepts for a detector whose backbone is converted: anchor strides and RoI
#: pooling scales ``grid / image`` as floats ("float", they follow the learned sizes) or torchvision's
#: integer strides and power-of-two scales ("integer").
ANCHORS = ("float", "integer")
# Packages whose already-imported classes a recipe may name as leaf modules without trust_code.
TRUSTED_LEAF_PACKAGES = ("torch", "torchvision", "timm", "dynoswap")


def is_saved_model(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by ``dynoswap.save`` (it holds the recipe file)."""
    folder = Path(path)
    return folder.is_dir() and (folder / RECIPE_FILE).is_file()


#: The output kind ``save(..., overwrite=True)`` and ``convert -o --force`` may replace.
SAVED_MODEL = "saved model"


def is_own_saved_model(path: Path) -> bool:
    """Whether ``path`` is, by its content, a saved model dynoswap wrote: what ``--force`` may replace.

    A real folder (not a link) holding only the recipe and weights files, whose recipe
    parses as a dynoswap saved-model recipe. A folder that only has the right file names
    (another tool's ``recipe.json``) is not one.
    """
    if path.is_symlink() or not path.is_dir():
        return False
    entries = {p.name for p in path.iterdir()}
    if RECIPE_FILE not in entries or not entries <= {RECIPE_FILE, WEIGHTS_FILE}:
        return False
    if not all(stat.S_ISREG((path / name).lstat().st_mode) for name in entries):
        return False
    try:
        Recipe.read(path)
    except (DynoswapError, ValueError, OSError):
        return False
    return True


register_output_kind(SAVED_MODEL, is_own_saved_model)


# -- field checks -------------------------------------------------------------------
class _Reader:
    """Typed access to a JSON mapping; every failure names the file and the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, path: str, message: str) -> RecipeError:
        return RecipeError(f"{self.where}: field '{path}' {message}")

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping, got {_kind(value)}")
        return value

    def get(self, data: Mapping[str, Any], key: str, path: str, default: Any = ...) -> Any:
        if key in data:
            return data[key]
        if default is ...:
            raise self.fail(f"{path}{key}", "is missing")
        return default

    def string(self, value: Any, path: str, choices: tuple[str, ...] = ()) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {_kind(value)}")
        if choices and value not in choices:
            raise self.fail(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def integer(self, value: Any, path: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be an integer, got {_kind(value)}")
        if not low <= value <= high:
            raise self.fail(path, f"must be between {low} and {high}, got {value}")
        return value

    def whole(self, value: Any, path: str, low: int, high: int) -> int:
        """Return an integer, also one written as a float with no fraction (recipes store sizes as 56.0)."""
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return self.integer(value, path, low, high)

    def number(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(path, f"must be a number, got {_kind(value)}")
        if not math.isfinite(value) or value <= 0:
            raise self.fail(path, f"must be finite and > 0, got {value}")
        return float(value)

    def items(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(path, f"must be a list, got {_kind(value)}")
        return value

    def pair(self, value: Any, path: str, convert: Callable[[Any, str], Any]) -> tuple[Any, Any]:
        values = self.items(value, path)
        if len(values) != 2:
            raise self.fail(path, f"must be a pair [h, w], got {len(values)} values")
        return convert(values[0], f"{path}[0]"), convert(values[1], f"{path}[1]")

    def axes(self, value: Any, path: str, convert: Callable[[Any, str], Any], ndim: int | None) -> tuple[Any, ...]:
        """One value per spatial axis: ``ndim`` of them, or 1 to 3 when ``ndim`` is None (an input size)."""
        if ndim == 2:
            return self.pair(value, path, convert)
        values = self.items(value, path)
        if len(values) != ndim if ndim is not None else not 1 <= len(values) <= 3:
            wanted = f"{ndim} values" if ndim is not None else "1 to 3 values ([L], [H, W] or [T, H, W])"
            raise self.fail(path, f"must have {wanted}, got {len(values)} values")
        return tuple(convert(v, f"{path}[{i}]") for i, v in enumerate(values))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# -- the recipe ---------------------------------------------------------------------
@dataclass
class RecipeOptions:
    """The options ``dynoswap.convert`` was called with, replayed on load.

    Attributes:
        placement: ``"post"`` or ``"pre"``.
        init_scale: One initial scale (r_h, r_w) for every DynOPool, or None for 1/stride.
        overrides: Initial scale per DynOPool or replaced node name.
        sizes: Target size per tie group at the input size.
        leaf_modules: Opaque modules: submodule names or ``class:module:qualname``.
        patchify: ``"post"`` or ``"skip"``.
        head: How the classifier head is handled (``"none"``, ``"adapt"``); None when the
            converter did not record it.
        init_alphas: Initial alpha (h, w) per DynOPool name, when the converter records them.
        submodule: Path of the converted part (``"backbone"``) when one submodule was converted in
            place; None for a whole-model conversion. The input size is that part's input size.
        anchors: How a converted detector's anchor generators and RoI poolers compute strides
            (:data:`ANCHORS`); None when the model has no anchor generator.
    """

    placement: str = "post"
    init_scale: tuple[float, ...] | None = None
    overrides: dict[str, tuple[float, ...]] = field(default_factory=dict)
    sizes: list[tuple[int, ...]] | None = None
    leaf_modules: list[str] = field(default_factory=list)
    patchify: str = "post"
    head: str | None = None
    init_alphas: dict[str, tuple[float, ...]] | None = None
    submodule: str | None = None
    anchors: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; fields added after version 1 appear only when set."""
        data: dict[str, Any] = {
            "placement": self.placement,
            "init_scale": list(self.init_scale) if self.init_scale is not None else None,
            "overrides": {k: list(v) for k, v in self.overrides.items()},
            "sizes": [list(s) for s in self.sizes] if self.sizes is not None else None,
            "leaf_modules": list(self.leaf_modules),
            "patchify": self.patchify,
        }
        if self.head is not None:
            data["head"] = self.head
        if self.init_alphas is not None:
            data["init_alphas"] = {k: list(v) for k, v in self.init_alphas.items()}
        if self.submodule is not None:
            data["submodule"] = self.submodule
        if self.anchors is not None:
            data["anchors"] = self.anchors
        return data

    def convert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``dynoswap.convert`` (leaf modules still encoded; see ``resolve_leaf``)."""
        data = self.to_dict()
        data.pop("init_alphas", None)  # recorded for reading, the weights carry the alphas
        return data

    @classmethod
    def parse(cls, data: Any, read: _Reader, input_size: tuple[int, ...]) -> RecipeOptions:
        """Validate the ``options`` mapping."""
        data = read.mapping(data, "recipe.options")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise read.fail(
                f"recipe.options.{unknown[0]}", f"is not a known option (known: {', '.join(sorted(known))})"
            )
        opts = cls()
        p = "recipe.options."
        opts.placement = read.string(data.get("placement", "post"), p + "placement", PLACEMENTS)
        opts.patchify = read.string(data.get("patchify", "post"), p + "patchify", PATCHIFY)
        ndim = len(input_size)
        if data.get("init_scale") is not None:
            opts.init_scale = read.axes(data["init_scale"], p + "init_scale", read.number, ndim)
        overrides = read.mapping(data.get("overrides") or {}, p + "overrides")
        opts.overrides = {str(k): read.axes(v, f"{p}overrides.{k}", read.number, ndim) for k, v in overrides.items()}
        if data.get("sizes") is not None:
            limit = MAX_UPSAMPLE * max(input_size)
            side = lambda v, path: read.whole(v, path, 2, limit)  # noqa: E731 - one bound for every axis
            opts.sizes = [
                read.axes(s, f"{p}sizes[{i}]", side, ndim) for i, s in enumerate(read.items(data["sizes"], p + "sizes"))
            ]
        leaves = read.items(data.get("leaf_modules") or [], p + "leaf_modules")
        opts.leaf_modules = [read.string(v, f"{p}leaf_modules[{i}]") for i, v in enumerate(leaves)]
        if data.get("head") is not None:
            opts.head = read.string(data["head"], p + "head", HEADS)
        if data.get("init_alphas") is not None:
            alphas = read.mapping(data["init_alphas"], p + "init_alphas")
            opts.init_alphas = {
                str(k): read.axes(v, f"{p}init_alphas.{k}", read.number, ndim) for k, v in alphas.items()
            }
        if data.get("submodule") is not None:
            try:  # only its shape here: load resolves it child by child on the model it rebuilt
                opts.submodule = check_submodule_path(data["submodule"], "it")
            except ValueError as exc:
                raise read.fail(p + "submodule", str(exc).removeprefix("it ")) from exc
        if data.get("anchors") is not None:
            opts.anchors = read.string(data["anchors"], p + "anchors", ANCHORS)
        return opts


@dataclass
class Recipe:
    """How to rebuild a converted model: its source, input size, conversion options and what was replaced.

    Attributes:
        source: The base model (random weights), checked by the trust policy before it is built; None for a
            model converted without ``source=`` (it cannot be saved).
        input_size: (H, W) the model was converted at.
        options: The conversion options.
        replacements: Report rows of the replaced resizers (informational).
        skipped: Report rows of resizers kept as they were (informational).
        groups: DynOPool names per tie group, in execution order.
        version: dynoswap version that converted the model.
        aliases: Weight keys stored once, mapped to the key that holds them (saved folders only).
        frozen: A frozen model's record (:class:`dynoswap.export.freeze.FrozenSpec` as a dict): what
            each DynOPool was fixed to. None for a model whose scales still train.
    """

    source: ModelSource | None
    input_size: tuple[int, ...]
    options: RecipeOptions = field(default_factory=RecipeOptions)
    replacements: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)
    version: str = ""
    aliases: dict[str, str] = field(default_factory=dict)
    frozen: dict[str, Any] | None = None

    # -- the dict in gm.meta ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return the recipe dict kept in ``gm.meta["dynoswap"]`` (without the saved folder's aliases)."""
        data = {
            "version": self.version,
            "source": self.source.to_dict() if self.source is not None else None,
            "input_size": list(self.input_size),
            "options": self.options.to_dict(),
            "replacements": list(self.replacements),
            "skipped": list(self.skipped),
            "groups": [list(g) for g in self.groups],
        }
        if self.frozen is not None:
            data["frozen"] = dict(self.frozen)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Validate a recipe dict (as in ``gm.meta`` or a document's ``recipe``)."""
        read = _Reader(where)
        data = read.mapping(data, "recipe")
        source = read.get(data, "source", "recipe.")
        if source is not None:
            src = read.mapping(source, "recipe.source")
            library = read.string(read.get(src, "library", "recipe.source."), "recipe.source.library", LIBRARIES)
            name = read.string(read.get(src, "name", "recipe.source."), "recipe.source.name")
            if not name:
                raise read.fail("recipe.source.name", "is empty")
            kwargs = read.mapping(src.get("kwargs") or {}, "recipe.source.kwargs")
            source = ModelSource(library, name, dict(kwargs))
        size = lambda v, path: read.integer(v, path, 1, MAX_INPUT_SIDE)  # noqa: E731
        input_size = read.axes(read.get(data, "input_size", "recipe."), "recipe.input_size", size, None)
        try:
            check_input_budget(input_size, "is")
        except ValueError as exc:
            raise read.fail("recipe.input_size", str(exc)) from exc
        options = RecipeOptions.parse(read.get(data, "options", "recipe."), read, input_size)
        rows = {}
        for key in ("replacements", "skipped"):
            items = read.items(data.get(key) or [], f"recipe.{key}")
            rows[key] = [read.mapping(r, f"recipe.{key}[{i}]") for i, r in enumerate(items)]
        groups = read.items(data.get("groups") or [], "recipe.groups")
        parsed_groups = [
            [read.string(n, f"recipe.groups[{i}][{j}]") for j, n in enumerate(read.items(g, f"recipe.groups[{i}]"))]
            for i, g in enumerate(groups)
        ]
        if options.sizes is not None and parsed_groups and len(options.sizes) != len(parsed_groups):
            raise read.fail(
                "recipe.options.sizes", f"has {len(options.sizes)} entries for {len(parsed_groups)} tie groups"
            )
        version = data.get("version", "")
        frozen = data.get("frozen")
        if frozen is not None:
            from ..export.freeze import FrozenSpec

            try:
                frozen = FrozenSpec.from_dict(frozen).to_dict()
            except RecipeError as exc:
                raise read.fail("recipe.frozen", str(exc)) from exc
        return cls(
            source=source,
            input_size=input_size,
            options=options,
            replacements=rows["replacements"],
            skipped=rows["skipped"],
            groups=parsed_groups,
            version=str(version) if isinstance(version, (str, int, float)) else "",
            frozen=frozen,
        )

    # -- the saved document ----------------------------------------------------------
    def to_json(self, summary: Mapping[str, Any] | None = None) -> str:
        """Return the saved folder's recipe document.

        Args:
            summary: What ``inspect`` shows of the model at its input size (see :func:`read_summary`),
                recorded alongside the recipe; ``load`` never reads it.
        """
        document = {
            "format": FORMAT,
            # A frozen model is version 2, so a dynoswap that cannot freeze never loads it as a converted one.
            "format_version": FROZEN_FORMAT_VERSION if self.frozen is not None else FORMAT_VERSION,
            "recipe": self.to_dict(),
            "aliases": dict(self.aliases),
        }
        if summary is not None:
            document[SUMMARY_KEY] = dict(summary)
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, where: str = RECIPE_FILE) -> Recipe:
        """Parse and validate a recipe document; any problem is one ``RecipeError`` naming ``where``."""
        if len(text) > MAX_JSON_BYTES:
            raise RecipeError(f"{where}: larger than {MAX_JSON_BYTES} bytes, the most dynoswap reads; refusing it")
        document = loads_json(text, where, RecipeError)
        read = _Reader(where)
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            found = document.get("format") if isinstance(document, dict) else _kind(document)
            raise RecipeError(f"{where} is not a dynoswap recipe (format {found!r}, expected {FORMAT!r})")
        version = read.get(document, "format_version", "")
        if isinstance(version, bool) or not isinstance(version, int):
            raise read.fail("format_version", f"must be an integer, got {_kind(version)}")
        reader = READERS.get(version)
        if reader is None:
            newest = max(READERS)
            hint = "upgrade dynoswap to read it" if version > newest else "it was never written by dynoswap"
            raise RecipeError(f"{where}: format version {version} is unknown (this dynoswap reads 1-{newest}); {hint}")
        return reader(document, read)

    @classmethod
    def read(cls, folder: str | os.PathLike[str]) -> Recipe:
        """Read a saved folder's recipe document."""
        file = Path(folder) / RECIPE_FILE
        if not Path(folder).is_dir():
            raise RecipeError(f"{folder} is not a saved dynoswap model (not a folder)")
        if not file.is_file():
            raise RecipeError(f"{folder} is not a saved dynoswap model (no {RECIPE_FILE})")
        return cls.from_json(read_capped(file, MAX_JSON_BYTES, RecipeError, "recipe"), str(file))


def _read_v1(document: dict[str, Any], read: _Reader) -> Recipe:
    recipe = Recipe.from_dict(read.get(document, "recipe", ""), read.where)
    if recipe.source is None:
        raise read.fail("recipe.source", "is null: a saved model must name the model it was converted from")
    aliases = read.mapping(document.get("aliases") or {}, "aliases")
    recipe.aliases = {read.string(k, "aliases"): read.string(v, f"aliases.{k}") for k, v in aliases.items()}
    return recipe


def _read_v2(document: dict[str, Any], read: _Reader) -> Recipe:
    recipe = _read_v1(document, read)
    if recipe.frozen is None:
        raise read.fail("recipe.frozen", "is missing: format version 2 is a frozen model")
    return recipe


#: Document readers by format version.
READERS: dict[int, Callable[[dict[str, Any], _Reader], Recipe]] = {1: _read_v1, 2: _read_v2}


# -- the recorded summary -----------------------------------------------------------------
#: Document key of the summary recorded when a model is saved: what ``inspect`` shows without building it.
SUMMARY_KEY = "summary"


def _summary(data: Any) -> dict[str, Any]:
    """Check a recorded summary's shape; raises ValueError or TypeError on anything else."""
    pair = lambda v, kind: [kind(x) for x in v] if isinstance(v, list) and 1 <= len(v) <= 3 else _bad(v)  # noqa: E731
    if not isinstance(data, dict):
        raise TypeError("not an object")
    gmacs, params = data["gmacs"], data["params"]
    if not isinstance(gmacs, (int, float)) or isinstance(params, bool) or not isinstance(params, int):
        raise TypeError("gmacs or params")
    rows = data["dynopools"]
    if not isinstance(rows, list) or not isinstance(data["stages"], list):
        raise TypeError("stages or dynopools")
    return {
        "input_size": pair(data["input_size"], int),
        "gmacs": float(gmacs),
        "params": params,
        "stages": [pair(s, int) for s in data["stages"]],
        "dynopools": [
            {
                "name": str(r["name"]),
                "alpha": pair(r["alpha"], float),
                "scale": pair(r["scale"], float),
                "in": pair(r["in"], int),
                "out": pair(r["out"], int),
                "group": str(r["group"]),
            }
            for r in rows
        ],
    }


def _bad(value: Any) -> Any:
    raise TypeError(f"not a pair: {value!r}")


def read_summary(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the summary recorded in a saved folder's recipe document, or None when it has none.

    The summary (``input_size``, ``gmacs``, ``params``, ``stages``, ``dynopools``) is a record of
    what the model was when it was saved: a malformed one counts as none, and callers check it
    against the weights before showing it.
    """
    file = Path(folder) / RECIPE_FILE
    if not file.is_file():
        return None
    try:
        document = loads_json(read_capped(file, MAX_JSON_BYTES, RecipeError, "recipe"), str(file), RecipeError)
        data = document.get(SUMMARY_KEY) if isinstance(document, dict) else None
        return _summary(data) if data is not None else None
    except (RecipeError, KeyError, TypeError, ValueError):
        return None


# -- accessors ------------------------------------------------------------------------
def recipe_of(model: nn.Module) -> Recipe:
    """Return the typed recipe of a converted model (its ``meta["dynoswap"]``).

    Raises:
        RecipeError: The model carries no recipe (not the output of ``dynoswap.convert``) or a malformed one.
    """
    data = raw_recipe_of(model)
    if data is None:
        raise RecipeError("not a converted model: it carries no dynoswap recipe (use the output of dynoswap.convert)")
    if isinstance(data, Recipe):
        return data
    return Recipe.from_dict(data, "the model's recipe")


def raw_recipe_of(model: Any) -> dict[str, Any] | None:
    """Return the recipe dict in a model's ``meta`` (None for a model that was not converted)."""
    meta = getattr(model, "meta", None)
    value = meta.get(RECIPE_KEY) if isinstance(meta, dict) else None
    return value if isinstance(value, dict) else None


def input_size_of(model: Any) -> tuple[int, ...] | None:
    """Return the input size a converted model was built for ((L,), (H, W) or (T, H, W)), or None."""
    data = raw_recipe_of(model)
    size = data.get("input_size") if data else None
    return tuple(int(v) for v in size) if isinstance(size, (list, tuple)) and 1 <= len(size) <= 3 else None


def part_of(model: Any) -> str | None:
    """Return the path of a model's converted part (``convert(..., submodule=...)``), or None."""
    data = raw_recipe_of(model)
    options = data.get("options") if data else None
    value = options.get("submodule") if isinstance(options, dict) else None
    return value if isinstance(value, str) else None


def walk_part(model: nn.Module, path: str) -> tuple[nn.Module, str, str | None]:
    """Follow a dotted ``path`` child by child (``named_children``, never ``getattr``).

    Returns:
        The deepest module reached, the path walked to it, and the first child name that is
        missing (None when the whole path exists).
    """
    module, walked = model, ""
    for part in path.split("."):
        child = dict(module.named_children()).get(part)
        if child is None:
            return module, walked, part
        module, walked = child, f"{walked}.{part}" if walked else part
    return module, walked, None


def converted_part(model: nn.Module) -> nn.Module:
    """Return the converted part of a whole model (``convert(..., submodule=...)``); the model itself otherwise."""
    path = part_of(model)
    if path is None:
        return model
    module, _, missing = walk_part(model, path)
    return model if missing is not None else module


def check_leaf(text: str, *, trust_code: bool = False, where: str = "recipe") -> None:
    """Refuse a leaf class outside torch, torchvision, timm and dynoswap unless ``trust_code``; imports nothing."""
    if not text.startswith("class:"):
        return
    module_name = text.split(":", 2)[1] if text.count(":") >= 2 else ""
    if module_name.split(".", 1)[0] not in TRUSTED_LEAF_PACKAGES and not trust_code:
        raise UntrustedCodeError(
            f"refused leaf module {text!r} in {where}: it would import module {module_name!r}; "
            "user code runs only when you trust it (trust_code=True)"
        )


def resolve_leaf(text: str, *, trust_code: bool = False, where: str = "recipe") -> Any:
    """Decode a leaf-module entry: a submodule name, or ``class:module:qualname``.

    A class of torch, torchvision, timm or dynoswap is taken from the modules already
    imported (building the model imported them); nothing is imported without ``trust_code``.

    Raises:
        UntrustedCodeError: The class would need an import, or lies outside the trusted packages.
        RecipeError: The entry is malformed or does not name a module class.
    """
    if not text.startswith("class:"):
        return text
    parts = text.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise RecipeError(f"{where}: leaf module {text!r} must look like 'class:module:QualName'")
    _, module_name, qualname = parts
    check_leaf(text, trust_code=trust_code, where=where)
    module = sys.modules.get(module_name)
    if module is None:
        if not trust_code:
            raise UntrustedCodeError(
                f"refused leaf module {text!r} in {where}: module {module_name!r} is not imported by the model, "
                "and importing it runs its code; that happens only when you trust it (trust_code=True)"
            )
        import importlib

        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise RecipeError(f"{where}: leaf module {text!r}: {module_name} has no attribute {qualname!r}")
    from torch import nn

    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise RecipeError(f"{where}: leaf module {text!r} is not a torch.nn.Module class")
    return obj
