"""save()/load(): a folder with a JSON recipe and safetensors weights.

Nothing is pickled and nothing named by the file runs without the caller's consent:
``load`` checks the recipe's source against the trust policy
(:mod:`dynoswap.sources`), rebuilds the base model (random init, never downloads),
replays the conversion with the recorded options and loads the weights strictly.
``save`` writes through :func:`dynoswap.io.output.replace_output` (locked, crash-safe)
and reads what it wrote back before reporting success.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import (
    CheckpointError,
    ConversionError,
    DynoswapError,
    OptionError,
    OutputExistsError,
    RecipeError,
    SaveError,
)
from ..layers import DynOPoolNd
from ..sources import SAVED, ModelSource, build_model, check_source
from ..validate import check_alpha
from .checkpoint import report_nonfinite
from .output import replace_output
from .recipe import (
    FORMAT,
    FORMAT_VERSION,
    RECIPE_FILE,
    RECIPE_KEY,
    SAVED_MODEL,
    WEIGHTS_FILE,
    Recipe,
    check_leaf,
    raw_recipe_of,
    recipe_of,
    resolve_leaf,
)
from .run import saved_model_folder

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "RECIPE_FILE",
    "RECIPE_KEY",
    "WEIGHTS_FILE",
    "OutputExistsError",
    "SaveError",
    "check_values",
    "load",
    "read_recipe",
    "read_weights",
    "record_source",
    "save",
    "verify_saved",
    "write_saved",
]


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors, each storage once; aliases map repeated keys to the kept one."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().to("cpu").contiguous().clone()
    return tensors, aliases


def _savable_recipe(model: nn.Module) -> Recipe:
    if raw_recipe_of(model) is None:
        raise SaveError("not a converted model: dynoswap.save needs the output of dynoswap.convert")
    data = raw_recipe_of(model) or {}
    if not data.get("source"):
        raise SaveError(
            "the model's source is unknown, so load() could not rebuild it: name the function that builds "
            "the unconverted model, save(model, path, source='mypkg.models:make') (loaded back with "
            "trust_code=True), or pass source= to convert"
        )
    if isinstance(data["source"], dict) and data["source"].get("library") == SAVED:
        raise SaveError("the model's source is a saved model: convert the original model, not a loaded one")
    try:
        return recipe_of(model)
    except RecipeError as exc:
        raise SaveError(f"cannot save: {exc}") from exc


def write_saved(model: nn.Module, folder: Path, summary: dict[str, Any] | None = None) -> None:
    """Write the recipe and weights of ``model`` into a new folder (no checks, no swap).

    Args:
        model: A converted model.
        folder: The folder to create.
        summary: What ``inspect`` shows of the model at its recipe's input size (``input_size``,
            ``gmacs``, ``params``, ``stages``, ``dynopools``), recorded so that ``inspect`` need not build it.
    """
    from safetensors.torch import save_file

    recipe = _savable_recipe(model)
    tensors, aliases = _dedupe(model.state_dict())
    recipe.aliases = aliases
    folder.mkdir()
    (folder / RECIPE_FILE).write_text(recipe.to_json(summary))
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})


def verify_saved(model: nn.Module, folder: Path) -> None:
    """Load ``folder`` back and compare its state dict and one forward with ``model``.

    Raises:
        SaveError: The folder does not load, or loads as a different model.
    """
    recipe = _savable_recipe(model)
    try:
        loaded = load(folder, trust_code=True)  # the code was already trusted to build ``model``
    except DynoswapError as exc:  # a refusal of what was written; anything else is a bug and propagates
        raise SaveError(f"the saved model does not load back: {exc}") from exc
    own, back = model.state_dict(), loaded.state_dict()
    if list(own) != list(back):
        raise SaveError("the saved model loads back with other weight names than the model")
    for key, value in own.items():
        if not torch.equal(value.detach().cpu(), back[key]) and not _both_nan(value, back[key]):
            raise SaveError(f"the saved model loads back with other values for {key}")
    example = _example(model, recipe)
    outputs = []
    for m in (model, loaded):
        was = m.training
        m.eval()
        try:
            with torch.no_grad():
                outputs.append(m(example.to(_device(m))))
        finally:
            m.train(was)
    if not _same_outputs(outputs[0], outputs[1]):
        raise SaveError("the saved model loads back but computes other outputs than the model")


def _both_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    a = a.detach().cpu()
    return a.dtype.is_floating_point and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b))


def _device(model: nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _example(model: nn.Module, recipe: Recipe) -> torch.Tensor:
    """Return a fixed random batch of one at the recipe's input size."""
    from ..cost.count import infer_in_chans

    gen = torch.Generator().manual_seed(0)
    return torch.randn(1, infer_in_chans(model, ndim=len(recipe.input_size)), *recipe.input_size, generator=gen)


def _same_outputs(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        # Bit-identical, NaN where the model itself gives NaN.
        return a.shape == b.shape and bool(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_outputs(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_outputs(a[k], b[k]) for k in a)
    return bool(a == b)


def _as_source(source: str | ModelSource) -> ModelSource:
    """``"pkg.module:factory"`` (called with no arguments) or a :class:`ModelSource`, checked for form only."""
    if isinstance(source, ModelSource):
        return source
    if not isinstance(source, str) or source.count(":") != 1 or not all(source.partition(":")[::2]):
        raise SaveError(
            f"source must name a factory as 'package.module:function' (or be a ModelSource), got {source!r}"
        )
    return ModelSource("user", source)


def record_source(model: nn.Module, source: str | ModelSource) -> None:
    """Record in a converted model's recipe where its base model comes from (what ``load`` rebuilds).

    Args:
        model: A GraphModule returned by ``dynoswap.convert``.
        source: ``"pkg.module:factory"`` for your own model class: a function importable by the
            process that loads, returning the unconverted model (random weights are fine, the saved
            weights replace them); or a :class:`ModelSource` (a factory with keyword arguments, or
            a torchvision/timm name).

    Raises:
        SaveError: Not a converted model, or ``source`` is not of that form.
    """
    data = raw_recipe_of(model)
    if data is None:
        raise SaveError("not a converted model: dynoswap.save needs the output of dynoswap.convert")
    data["source"] = _as_source(source).to_dict()


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = True,
    source: str | ModelSource | None = None,
) -> Path:
    """Write ``path/recipe.json`` and ``path/model.safetensors``, verified, crash-safe.

    The folder is written next to ``path``, loaded back and compared with ``model``
    (state dict and one forward), then swapped in; another process writing ``path``
    at the same time makes this call fail instead of racing it.

    Args:
        model: A GraphModule returned by ``dynoswap.convert``.
        path: Output folder.
        overwrite: Replace an existing saved model at ``path`` (anything else there is refused).
        source: Where the unconverted model comes from, when ``convert`` was not told (a model class of
            your own): ``"pkg.module:factory"``, or a :class:`ModelSource` with keyword arguments. It is
            recorded in the model's recipe (see :func:`record_source`) if the save succeeds; loading it
            back imports and calls the factory, so it needs ``load(..., trust_code=True)``.

    Returns:
        The output folder.

    Raises:
        SaveError: Not a converted model, an unknown source, or a save that does not read back (a
            factory that cannot be imported or builds another model included).
        OutputExistsError: ``path`` holds something else, or a saved model and ``overwrite`` is False.
        OutputLockedError: Another process is writing ``path``.
    """
    data = raw_recipe_of(model)
    previous = data.get("source") if data is not None else None
    if source is not None:
        record_source(model, source)
    try:
        _savable_recipe(model)
        with replace_output(path, SAVED_MODEL, force=overwrite) as work:
            write_saved(model, work)
            verify_saved(model, work)
    except BaseException:
        if source is not None and data is not None:
            data["source"] = previous  # a failed save leaves the model as it was
        raise
    return Path(path)


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate the recipe document of a saved model folder (as a dict)."""
    recipe = Recipe.read(saved_model_folder(path))
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "recipe": recipe.to_dict(), "aliases": recipe.aliases}


def read_weights(path: str | os.PathLike[str], recipe: Recipe | None = None) -> dict[str, torch.Tensor]:
    """Read the full state dict of a saved model folder, keys stored once expanded to every alias."""
    from safetensors.torch import load_file

    path = saved_model_folder(path)
    recipe = recipe or Recipe.read(path)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is an incomplete saved model: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read {file}: {' '.join(str(exc).split()) or type(exc).__name__}") from exc
    for alias, key in recipe.aliases.items():
        if key not in state:
            raise RecipeError(f"{Path(path) / RECIPE_FILE}: alias {alias!r} names {key!r}, which {WEIGHTS_FILE} lacks")
        state[alias] = state[key]
    return state


def check_values(state: dict[str, torch.Tensor], where: str, strict: bool = False) -> list[str]:
    """Report weights holding NaN or infinity: a warning, or a ``CheckpointError`` when ``strict``.

    Returns:
        The keys of the non-finite tensors.
    """
    bad = [k for k, v in state.items() if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())]
    report_nonfinite(bad, where, strict, stacklevel=4)
    return bad


def _check_alphas(state: dict[str, torch.Tensor], where: str, model: nn.Module) -> None:
    """DynOPool alphas must be finite and within the scale limit or the model cannot run: always an error.

    Only the alphas of ``model``'s DynOPoolNd layers are checked: a model's own parameter that happens
    to be called ``alpha`` (a layer scale, say) is not a scale.
    """
    keys = {f"{name}.alpha" for name, m in model.named_modules() if isinstance(m, DynOPoolNd) and m.leader is m}
    for key, value in state.items():
        if key in keys and value.dtype.is_floating_point:
            try:
                check_alpha(value.detach().flatten().tolist(), f"{where}: {key}")
            except ValueError as exc:
                raise CheckpointError(f"{exc}; the file is damaged") from exc


def load(path: str | os.PathLike[str], *, trust_code: bool = False, strict_values: bool = False) -> nn.Module:
    """Rebuild a saved converted model: source checked and built, conversion replayed, weights loaded strictly.

    Returns the converted GraphModule, or the whole model when one part of it was converted (``submodule``).

    Args:
        path: A folder written by :func:`save`, or a training run folder (``dynoswap train -o RUN``):
            its final model, the ``model/`` of its newest intact checkpoint, verified against the
            checkpoint's manifest.
        trust_code: Allow a recipe that names a user factory or user leaf modules (they are imported and called).
        strict_values: Refuse weights holding NaN or infinity (by default they are reported with a warning).

    Raises:
        RecipeError: The folder is not a saved model, or its recipe is malformed or of an unknown version.
        ModelError: A run folder without a checkpoint, or whose checkpoint holds weights only.
        UntrustedCodeError: The recipe would import or call code and ``trust_code`` is False.
        CheckpointError: The weights cannot be read, are damaged, or do not fit the recipe's model.
    """
    from ..engine.convert import convert

    folder = saved_model_folder(path)
    recipe = Recipe.read(folder)
    where = str(folder / RECIPE_FILE)
    weights_file = folder / WEIGHTS_FILE
    if not weights_file.is_file():
        raise CheckpointError(f"{folder} is an incomplete saved model: {WEIGHTS_FILE} is missing")
    source = recipe.source
    if source is None:  # Recipe.read refuses it; kept for the type checker
        raise RecipeError(f"{where}: field 'recipe.source' is null")
    # The source and every leaf module pass the trust policy before anything is imported or built.
    check_source(source, trust_code=trust_code, where=where)
    for leaf in recipe.options.leaf_modules:
        check_leaf(leaf, trust_code=trust_code, where=where)
    state = read_weights(folder, recipe)
    check_values(state, str(weights_file), strict=strict_values)
    base = build_model(source.library, source.name, source.kwargs, trust_code=trust_code, where=where)
    leaves = [resolve_leaf(s, trust_code=trust_code, where=where) for s in recipe.options.leaf_modules]
    options = recipe.options.convert_kwargs()
    options["leaf_modules"] = leaves
    try:  # a recorded submodule converts that part of the rebuilt model in place: gm is then the whole model
        gm: nn.Module = convert(base, recipe.input_size, source=source, check=False, **options)[0]
    except (ConversionError, OptionError) as exc:  # the conversion's own refusals; anything else is a bug
        raise RecipeError(f"{where}: the recorded conversion cannot be replayed: {' '.join(str(exc).split())}") from exc
    if recipe.frozen is not None:
        from ..export.freeze import refreeze

        gm = refreeze(gm, recipe.frozen)  # sizes/ratios from the record; the weights hold no alphas
    _check_alphas(state, str(weights_file), gm)
    try:
        gm.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(f"{weights_file} does not fit the model its recipe describes ({first})") from exc
    return gm
