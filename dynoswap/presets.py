"""YAML presets from the supplement's Tables 1 and 2: conversion options and training hyperparameters.

Presets are looked up in ``$DYNOSWAP_CONFIGS`` (``os.pathsep``-separated directories) and then in
the package's ``configs/`` (the repository's top-level ``configs/``, shipped in the wheel);
a path to a YAML file works too.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import PresetError, UntrustedCodeError
from .io.recipe import MAX_INPUT_SIDE

ENV_VAR = "DYNOSWAP_CONFIGS"
# In a checkout dynoswap/configs links to the top-level configs/; a wheel carries the files themselves.
BUILTIN_DIR = Path(__file__).resolve().parent / "configs"
PLACEMENTS = ("post", "pre")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "step", "constant", "poly")


@dataclass
class ConvertOptions:
    """Rule options for ``dynoswap.convert``.

    Attributes:
        input_size: (H, W) the model is converted at.
        num_classes: Classifier size of the backbone.
        placement: ``"post"`` (DynOPool after a strided conv made stride 1) or ``"pre"``.
        init_scale: Initial scale factor r of every DynOPool; None keeps each resizer's own
            1/stride (0.5, or 0.25 where a strided conv and a pool merge), the paper's choice.
        first_init_scale: Initial r of the first DynOPool (Table 2) where it departs from the
            human design; None keeps the design.
    """

    input_size: tuple[int, int] = (224, 224)
    num_classes: int | None = None
    placement: str = "post"
    init_scale: float | None = None
    first_init_scale: float | None = None


@dataclass
class TrainOptions:
    """Training hyperparameters (Table 1) and the GMACs loss weight lambda (Table 2).

    Attributes:
        gmacs_lambda: Weight of the GMACs loss (eq. 7).
        lr: Learning rate of the weights.
        alpha_lr: Learning rate of the DynOPool alphas.
        optimizer: ``"sgd"`` or ``"adamw"``.
        momentum: SGD momentum.
        scheduler: Learning-rate schedule.
        weight_decay: Weight decay of the weights (alphas get none).
        batch_size: Batch size per process.
        gpus: Number of processes the paper trained with.
        epochs: Training epochs.
        amp: Automatic mixed precision.
    """

    gmacs_lambda: float = 0.0
    lr: float = 0.1
    alpha_lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    scheduler: str = "cosine"
    weight_decay: float = 5e-4
    batch_size: int = 128
    gpus: int = 1
    epochs: int = 250
    amp: bool = False


@dataclass
class Preset:
    """A named preset: what to convert and how to train it.

    Attributes:
        name: Preset name, e.g. ``resnet50-imagenet-s``.
        backbone: Model name for ``dynoswap.models.resolve``.
        dataset: Data set the hyperparameters are for.
        variant: ``"s"`` (small) or ``"b"`` (big), the paper's DynOPool-S/-B.
        convert: Conversion rule options.
        train: Training hyperparameters.
        path: File the preset was read from.
    """

    name: str
    backbone: str | None = None
    dataset: str | None = None
    variant: str | None = None
    convert: ConvertOptions = field(default_factory=ConvertOptions)
    train: TrainOptions = field(default_factory=TrainOptions)
    path: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        data = asdict(self)
        data["convert"]["input_size"] = list(self.convert.input_size)
        data["path"] = str(self.path) if self.path else None
        return data


# -- validation ---------------------------------------------------------------
def _check_keys(section: str, data: dict[str, Any], cls: type, where: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise PresetError(
            f"{where}: unknown key(s) in '{section}': {', '.join(unknown)}; allowed: {', '.join(sorted(known))}"
        )


def _number(value: Any, key: str, where: str, kind: type = float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PresetError(f"{where}: '{key}' must be a number, got {value!r}")
    if kind is int and int(value) != value:
        raise PresetError(f"{where}: '{key}' must be an integer, got {value!r}")
    return kind(value)


def _choice(value: Any, key: str, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise PresetError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _parse_convert(data: dict[str, Any], where: str) -> ConvertOptions:
    _check_keys("convert", data, ConvertOptions, where)
    opts = ConvertOptions()
    if "input_size" in data:
        size = data["input_size"]
        if isinstance(size, int):
            size = [size, size]
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise PresetError(f"{where}: 'input_size' must be [H, W], got {size!r}")
        opts.input_size = (_number(size[0], "input_size", where, int), _number(size[1], "input_size", where, int))
        if min(opts.input_size) < 1 or max(opts.input_size) > MAX_INPUT_SIDE:
            raise PresetError(
                f"{where}: 'input_size' must be two positive integers [H, W] up to {MAX_INPUT_SIDE}, got {list(size)}"
            )
    if data.get("num_classes") is not None:
        opts.num_classes = _number(data["num_classes"], "num_classes", where, int)
        if opts.num_classes < 1:
            raise PresetError(f"{where}: 'num_classes' must be >= 1, got {opts.num_classes}")
    if "placement" in data:
        opts.placement = _choice(data["placement"], "placement", PLACEMENTS, where)
    if data.get("init_scale") is not None:
        opts.init_scale = _number(data["init_scale"], "init_scale", where)
    if data.get("first_init_scale") is not None:
        opts.first_init_scale = _number(data["first_init_scale"], "first_init_scale", where)
    for key in ("init_scale", "first_init_scale"):
        value = getattr(opts, key)
        if value is not None and value <= 0:
            raise PresetError(f"{where}: '{key}' must be > 0, got {value}")
        if value is not None and not math.isfinite(value):
            raise PresetError(f"{where}: '{key}' must be finite, got {value}")
    return opts


# How each training field is checked.
_TRAIN_KINDS: dict[str, Any] = {
    "gmacs_lambda": float,
    "lr": float,
    "alpha_lr": float,
    "momentum": float,
    "weight_decay": float,
    "batch_size": int,
    "gpus": int,
    "epochs": int,
}


def _parse_train(data: dict[str, Any], where: str) -> TrainOptions:
    _check_keys("train", data, TrainOptions, where)
    opts = TrainOptions()
    for key, kind in _TRAIN_KINDS.items():
        if key in data:
            value = _number(data[key], key, where, kind)
            if not math.isfinite(value) or value < 0:
                raise PresetError(f"{where}: '{key}' must be a finite number >= 0, got {value}")
            setattr(opts, key, value)
    if "optimizer" in data:
        opts.optimizer = _choice(data["optimizer"], "optimizer", OPTIMIZERS, where)
    if "scheduler" in data:
        opts.scheduler = _choice(data["scheduler"], "scheduler", SCHEDULERS, where)
    if "amp" in data:
        if not isinstance(data["amp"], bool):
            raise PresetError(f"{where}: 'amp' must be true or false, got {data['amp']!r}")
        opts.amp = data["amp"]
    return opts


TOP_KEYS = ("name", "backbone", "dataset", "variant", "convert", "train")


def _check_backbone(value: Any, where: str, trust_code: bool) -> str | None:
    """Return the backbone model name; one that names user code (``pkg.module:factory``) needs ``trust_code``."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise PresetError(f"{where}: 'backbone' must be a model name, got {value!r}")
    from .models import names_user_code

    if names_user_code(value) and not trust_code:
        raise UntrustedCodeError(
            f"{where}: backbone {value!r} names user code (it would import {value.partition(':')[0]!r}); "
            "user code runs only when you trust it (trust_code=True)"
        )
    return value


def parse_preset(data: Any, where: str = "<preset>", path: Path | None = None, trust_code: bool = False) -> Preset:
    """Validate a preset mapping (as read from YAML) and build a ``Preset``; imports and calls nothing."""
    if not isinstance(data, dict):
        raise PresetError(
            f"{where}: a preset must be a mapping with 'convert' and/or 'train', got {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise PresetError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_KEYS)}")
    for key in ("dataset", "variant"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise PresetError(f"{where}: '{key}' must be a string, got {data[key]!r}")
    for section in ("convert", "train"):
        if not isinstance(data.get(section) or {}, dict):
            raise PresetError(f"{where}: '{section}' must be a mapping")
    name = str(data.get("name") or (path.stem if path else where))
    return Preset(
        name=name,
        backbone=_check_backbone(data.get("backbone"), where, trust_code),
        dataset=data.get("dataset"),
        variant=data.get("variant"),
        convert=_parse_convert(data.get("convert") or {}, where),
        train=_parse_train(data.get("train") or {}, where),
        path=path,
    )


# -- lookup -------------------------------------------------------------------
def search_dirs() -> list[Path]:
    """Directories searched for named presets, in order."""
    dirs = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p]
    return [*dirs, BUILTIN_DIR]


def available_presets() -> dict[str, Path]:
    """Preset names found in the search directories (earlier directories win)."""
    found: dict[str, Path] = {}
    for directory in reversed(search_dirs()):
        if directory.is_dir():
            for path in sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml")):
                found[path.stem] = path
    return dict(sorted(found.items()))


def load_preset_file(path: str | Path, trust_code: bool = False) -> Preset:
    """Read and validate one YAML preset file (YAML's safe loader: no objects are built)."""
    from .io.bounded import read_yaml

    path = Path(path)
    if path.is_dir():
        raise PresetError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise PresetError(f"config file {path} does not exist")
    data = read_yaml(path, PresetError)
    return parse_preset(data, str(path), path, trust_code)


def load_preset(name_or_path: str | Path, trust_code: bool = False) -> Preset:
    """Load a preset by name (``resnet50-imagenet-s``) or from a YAML file path.

    Raises:
        PresetError: Unknown name (the message lists close names) or invalid content.
    """
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or os.sep in text or Path(text).is_file():
        return load_preset_file(text, trust_code)
    presets = available_presets()
    if text not in presets:
        import difflib

        close = difflib.get_close_matches(text, list(presets), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; available: {', '.join(presets) or 'none'}"
        raise PresetError(f"unknown preset {text!r}{hint}")
    return load_preset_file(presets[text], trust_code)
