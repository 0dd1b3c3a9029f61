"""convert(): trace -> find -> rewrite -> tie -> GraphModule + ConversionReport."""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import fx, nn

from ..cost.count import infer_in_chans
from ..errors import OptionError
from ..graph import NodeFailure, UnionFind, World, analyse, node_label, pool_size
from ..graph.modal import ModalGraphModule
from ..graph.propagate import eval_mode
from ..io.recipe import HEADS, RECIPE_KEY, Recipe, RecipeOptions
from ..layers import DynOPool1d, DynOPool2d, DynOPool3d, DynOPoolNd
from ..sources import ModelSource
from ..validate import check_convert_args, check_scale
from ..version import __version__
from .find import ADAPTIVE_POOLS, MODULE_NDIM, Resizer, Skip, find_resizers
from .report import ConversionError, ConversionReport, Replacement, Skipped
from .rewrite import RESIZED_CROPS, Site, apply_sites, plan_sites, resize_to_partner, upsample_factor
from .submodule import convert_part, with_part_hint
from .tie import ALREADY, OTHER_DIM, TieError, TieFinder
from .trace import LeafSpec, TraceError, readable_cause, trace

SHAPE_KEY = "dynoswap_shape"
#: The DynOPool that replaces a resizer of each dimension.
DYNOPOOL_BY_NDIM: dict[int, type[DynOPoolNd]] = {1: DynOPool1d, 2: DynOPool2d, 3: DynOPool3d}
#: Layers a model of each dimension resizes with, beside the ones the engine rewrites (``MODULE_NDIM``).
OTHER_RESIZERS: dict[type, int] = {
    nn.ConvTranspose1d: 1,
    nn.ConvTranspose2d: 2,
    nn.ConvTranspose3d: 3,
    nn.AdaptiveAvgPool1d: 1,
    nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveAvgPool2d: 2,
    nn.AdaptiveMaxPool2d: 2,
    nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool3d: 3,
}
#: Adaptive average pool of each dimension (``head="adapt"``).
ADAPTIVE_AVG: dict[int, type[nn.Module]] = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}
#: How the input size of each dimension is written.
SIZE_NAMES = {1: "(L,)", 2: "(H, W)", 3: "(T, H, W)"}
COST_NOTES = {
    "conv_post": "conv now runs at stride 1 before the DynOPool: its cost grows by stride_h * stride_w",
    "patchify_post": "patchify conv now runs at stride 1 ('same' padding): its cost grows by stride_h * stride_w",
}


def _axes(value: Any, what: str, ndim: int) -> tuple[float, ...]:
    """One number per axis from a number or a sequence of ``ndim`` numbers."""
    if isinstance(value, (int, float)):
        return (float(value),) * ndim
    values = tuple(value)
    if len(values) != ndim:
        raise OptionError(f"{what} must be a number or {ndim} numbers {SIZE_NAMES[ndim]}, got {value!r}")
    return tuple(float(v) for v in values)


def _check_scale(value: Any, what: str, ndim: int) -> tuple[float, ...]:
    try:
        return check_scale(value, what, ndim)
    except TypeError as err:
        raise OptionError(str(err)) from None


def _leaf_to_json(spec: LeafSpec) -> str:
    return f"class:{spec.__module__}:{spec.__qualname__}" if isinstance(spec, type) else str(spec)


def _site_keys(site: Site) -> set[str]:
    return {site.name, site.primary.name}


def _resolve_scales(
    sites: list[Site],
    groups: list[list[int]],
    defaults: dict[int, tuple[float, ...]],
    init_scale: Any,
    overrides: Mapping[str, Any] | None,
    ndim: int,
) -> dict[int, tuple[float, ...]]:
    """Pick the initial scale per site and axis: rule default, then global, then per-name overrides; one per group."""
    scales = dict(defaults)
    if init_scale is not None:
        pair = _check_scale(init_scale, "init_scale", ndim)
        scales = dict.fromkeys(scales, pair)
    chosen: dict[int, tuple[float, ...]] = {}
    if overrides:
        by_key = {key: s for s in sites for key in _site_keys(s)}
        merged_into = {m.name: s.name for s in sites for m in s.merged}
        for key, value in overrides.items():
            if key in merged_into:
                raise OptionError(
                    f"override '{key}': that resizer was merged into '{merged_into[key]}'; "
                    f"override '{merged_into[key]}' instead"
                )
            if key not in by_key:
                names = ", ".join(s.name for s in sites[:6])
                raise OptionError(
                    f"override '{key}' names no replaced resizer; use a DynOPool name or the node it replaces "
                    f"(e.g. {names}{', ...' if len(sites) > 6 else ''})"
                )
            chosen[by_key[key].index] = _check_scale(value, f"override '{key}'", ndim)
    out: dict[int, tuple[float, ...]] = {}
    for group in groups:
        picked = {chosen[i] for i in group if i in chosen}
        if len(picked) > 1:
            names = ", ".join(sites[i].name for i in group)
            raise OptionError(f"overrides disagree within one tie group ({names}): they share one scale")
        scale = picked.pop() if picked else scales[group[0]]
        for i in group:
            out[i] = scale
    return out


@torch.no_grad()
def _apply_sizes(
    gm: fx.GraphModule,
    pools: dict[int, DynOPoolNd],
    groups: list[list[int]],
    sizes: Sequence[Any],
    example: torch.Tensor,
) -> None:
    """Set each group's alpha to n_in / target, group by group in execution order."""
    if len(sizes) != len(groups):
        raise OptionError(f"sizes has {len(sizes)} entries but the model has {len(groups)} tie groups (one per alpha)")
    ndim = example.dim() - 2
    targets = []
    for i, size in enumerate(sizes):
        pair = _axes(size, f"sizes[{i}]", ndim)
        if not all(v >= 1 and float(v).is_integer() for v in pair):
            raise OptionError(f"sizes[{i}] must be positive integers, got {size!r}")
        targets.append(pair)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    done: set[int] = set()
    handles = []
    for index, pool in pools.items():

        def hook(module: nn.Module, args: tuple, index: int = index) -> None:
            g = group_of[index]
            if g in done:
                return
            n_in = args[0].shape[-ndim:]
            pools[groups[g][0]].alpha.copy_(torch.tensor([n / t for n, t in zip(n_in, targets[g], strict=True)]))
            done.add(g)

        handles.append(pool.register_forward_pre_hook(hook))
    try:
        with eval_mode(gm):
            gm(example)
    finally:
        for handle in handles:
            handle.remove()


def _original_out(site: Site) -> tuple[int, ...] | None:
    """Spatial size the site's resizers produced in the original model (its last merged op's output)."""
    last = site.merged[-1] if site.merged else site.primary
    shape = last.node.meta.get(SHAPE_KEY)
    ndim = site.primary.ndim
    return tuple(int(v) for v in shape[-ndim:]) if shape and len(shape) == ndim + 2 else None


def _was(r: Resizer) -> dict[str, Any]:
    return {
        "name": r.name,
        "op": r.op,
        "stride": list(r.stride),
        "kernel": list(r.kernel),
        "padding": list(r.padding) if isinstance(r.padding, tuple) else r.padding,
        "ceil_mode": r.ceil_mode,
    }


def _layer_ndim(m: nn.Module) -> int | None:
    """Spatial axes of a conv or pool (1, 2 or 3), None for other modules."""
    for cls in type(m).__mro__:
        if cls in MODULE_NDIM:
            return MODULE_NDIM[cls]
        if cls in OTHER_RESIZERS:
            return OTHER_RESIZERS[cls]
    return None


def _refuse_unsupported(model: nn.Module, ndim: int) -> None:
    """Already converted models, and models with more resized axes than ``input_size`` has, refused by name.

    A layer of another dimension that does not resize (a lambda layer's positional Conv3d in a 2-D
    model) is no reason to refuse, nor is a lower-dimensional resizer (a strided Conv1d over a 2-D
    model's tokens): the engine keeps it (see :func:`~dynoswap.engine.find.find_resizers`).
    """
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and RECIPE_KEY in meta or any(isinstance(m, DynOPoolNd) for m in model.modules()):
        raise TieError(
            "this model is already converted (it holds DynOPool layers): train it as it is, or convert the original",
            ALREADY,
        )
    found_own = False
    first_other = None
    for name, m in model.named_modules():
        layer_ndim = _layer_ndim(m)
        if layer_ndim is None:
            continue
        found_own = found_own or layer_ndim == ndim
        other = layer_ndim != ndim
        if layer_ndim > ndim and _resizes(m):
            raise _other_dim(m, name, layer_ndim, ndim, "resizes")
        if other and first_other is None:
            first_other = (m, name, layer_ndim)
    if not found_own and first_other is not None:
        raise _other_dim(*first_other, ndim, "is")


def _other_dim(m: nn.Module, name: str, layer_ndim: int, ndim: int, verb: str) -> TieError:
    return TieError(
        f"{type(m).__name__} at {name or 'the model'} {verb} {layer_ndim}-D but input_size has {ndim} "
        f"{'side' if ndim == 1 else 'sides'}: give input_size as {SIZE_NAMES[layer_ndim]} "
        f"(CLI: --input-size with {layer_ndim} {'number' if layer_ndim == 1 else 'numbers'})",
        OTHER_DIM,
        name,
    )


def _resizes(m: object) -> bool:
    """Whether a conv or pool changes its input's spatial size: an adaptive pool, or a stride above 1."""
    if isinstance(m, ADAPTIVE_POOLS):
        return True
    stride = getattr(m, "stride", 1)
    return any(int(v) != 1 for v in (stride if isinstance(stride, (tuple, list)) else (stride,)))


def _reference_shapes(gm: fx.GraphModule, size: tuple[int, ...], in_chans: int, device: torch.device) -> None:
    """Record each tensor node's shape at the conversion input size in ``node.meta['dynoswap_shape']``."""
    try:
        res = analyse(gm, [World(size)], lambda name, m: ((1.0,) * m.ndim, name), in_chans, device)
    except NodeFailure as failure:
        cause = readable_cause(failure.cause)
        if failure.node.op == "call_function" and failure.node.target is torch._assert:
            cause = "the model checks its input size there and refuses this one"
        raise ConversionError(
            f"the traced model fails on a {(1, in_chans, *size)} input at '{node_label(failure.node)}' ({cause}); "
            "check input_size"
        ) from failure.cause
    for node, shapes in res.shapes.items():
        node.meta[SHAPE_KEY] = shapes[0]


def _spatial_in(site: Site) -> tuple[int, ...] | None:
    """Spatial size of the site's input in the original model."""
    arg = site.primary.node.args[0] if site.primary.node.args else None
    shape = arg.meta.get(SHAPE_KEY) if isinstance(arg, fx.Node) else None
    ndim = site.primary.ndim
    return tuple(int(v) for v in shape[-ndim:]) if shape and len(shape) == ndim + 2 else None


def _shown(size: Sequence[Any]) -> str:
    return "x".join(str(v) for v in size)


def _exact_scale(site: Site, original: tuple[int, ...] | None) -> tuple[tuple[float, ...], str]:
    """Return the scale per axis that reproduces the original output size, and a note when it is not 1/stride."""
    scale = site.init_scale
    n_in = _spatial_in(site)
    if n_in is None or original is None:
        return scale, ""
    if pool_size(n_in, tuple(1 / r for r in scale)) == original:
        return scale, ""
    alphas = []
    for axis in range(len(n_in)):
        n, out = n_in[axis], original[axis]
        if out < 2:
            return scale, f"the original gives {_shown(original)}; a DynOPool gives at least 2 per axis"
        default = 1 / scale[axis]
        alphas.append(default if pool_size((n,), (default,))[0] == out else n / out)
    if any(r.ceil_mode for r in site.resizers):
        why = "ceil_mode"
    elif any(r.padding not in ((0, 0), "valid") for r in site.resizers) or any(
        r.kernel != r.stride for r in site.resizers
    ):
        why = f"padding/kernel on {_shown(n_in)}"
    else:
        why = f"odd size {_shown(n_in)}"
    shown = f"{alphas[0]:.5g}" if len(set(alphas)) == 1 else "x".join(f"{a:.5g}" for a in alphas)
    return tuple(1 / a for a in alphas), f"{why}: init alpha {shown} (original output {_shown(original)})"


@contextlib.contextmanager
def _at_reference(size: tuple[int, ...], exact: Mapping[str, tuple[Any, str]]) -> Iterator[None]:
    """Turn a failure of the converted model at its own input size (not a moved world) into a ConversionError.

    The usual cause is a resizer whose original output was below the 2-cell floor (a pool to 1x1 before a
    flatten into a Linear): its DynOPool gives 2 per axis, and the layers after it were built for 1.
    """
    try:
        yield
    except NodeFailure as failure:
        below = [f"{name} ({note})" for name, (_, note) in exact.items() if "at least 2 per axis" in note]
        why = f"; {', '.join(below)}: convert at a larger input size" if below else ""
        when = f"at its input size {_shown(size)}" if failure.world == 0 else "once DynOPool scales move"
        raise ConversionError(
            f"the converted model fails {when} at '{node_label(failure.node)}' ({readable_cause(failure.cause)}){why}"
        ) from failure.cause


@dataclass
class _Plan:
    """One traced graph, rewritten: its sites, what it kept, and each site's original geometry."""

    sites: list[Site]
    kept: list[tuple[Resizer, str]]
    skips: list[Skip]
    original_out: dict[str, tuple[int, ...] | None]
    exact: dict[str, tuple[tuple[float, ...], str]]


@functools.cache
def _reads_training(cls: Any) -> bool:
    """Whether a class's source mentions ``training`` (or cannot be read): its trace may depend on the mode."""
    if cls.__module__.startswith("torch.nn.modules"):
        return False  # torch's own modules are leaves or mode-independent when traced
    try:
        return "training" in inspect.getsource(cls)
    except (OSError, TypeError):
        return True


def _trace_modes(model: nn.Module, leaf_modules: Sequence[LeafSpec]) -> list[fx.GraphModule]:
    """Trace in training and in eval mode; one graph when both modes trace alike, else both (training first).

    The eval-mode trace is skipped when no module class of the model reads ``training`` in its source.
    """
    flags = [(m, m.training) for m in model.modules()]
    both = any(_reads_training(cls) for cls in {type(m) for m in model.modules()})  # type: ignore[arg-type,unused-ignore]
    try:
        model.train()
        train = trace(model, leaf_modules)
        views = [train]
        if both:
            model.eval()
            evaluation = trace(model, leaf_modules)
            if evaluation.code != train.code:
                views.append(evaluation)
    finally:
        for m, flag in flags:
            m.training = flag
    for view in views:
        view.training = model.training
    return views


def _prepare(
    view: fx.GraphModule,
    size: tuple[int, ...],
    in_chans: int,
    device: torch.device,
    placement: str,
    patchify: str,
    pools: dict[str, DynOPoolNd],
    mode: str | None = None,
) -> _Plan:
    """Find the resizers of one traced graph and plan their DynOPools (one module per name, shared by graphs)."""
    with eval_mode(view):
        try:
            _reference_shapes(view, size, in_chans, device)
        except ConversionError as err:
            if mode is None:
                raise
            raise ConversionError(f"in {mode} mode, {err}") from err
    resizers, skips = find_resizers(view, len(size))
    sites, kept = plan_sites(view, resizers, placement, patchify)
    original_out = {s.name: _original_out(s) for s in sites}  # read before the rewrite drops the nodes
    exact = {s.name: _exact_scale(s, original_out[s.name]) for s in sites}
    for s in sites:
        if s.name not in pools:
            pools[s.name] = DYNOPOOL_BY_NDIM[s.primary.ndim](exact[s.name][0], aggregate=s.aggregate)
    return _Plan(sites, kept, skips, original_out, exact)


def _resizer(view: fx.GraphModule) -> Any:
    def resize(upsample: fx.Node, partner: fx.Node, options: dict[str, Any]) -> None:
        resize_to_partner(view, upsample, partner, options)
        view.recompile()

    return resize


def _assemble(model: nn.Module, views: list[fx.GraphModule]) -> fx.GraphModule:
    """Build the converted module: the one graph, or both modes' graphs over one set of submodules."""
    if len(views) == 1:
        views[0].delete_all_unused_submodules()  # upsamplings rewritten to take their partner's size
        return views[0]
    holder: dict[str, Any] = {}
    for view in views:
        for node in view.graph.nodes:
            if node.op in ("call_module", "get_attr"):
                holder[str(node.target)] = _get_attr(view, str(node.target))
    gm = ModalGraphModule(holder, views[0].graph, views[1].graph, type(model).__name__)
    gm.training = model.training
    gm.meta.update(views[0].meta)
    return gm


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _adapt_head(gm: fx.GraphModule) -> Any:
    def adapt(source: fx.Node, child: fx.Node, size: tuple[int, ...]) -> None:
        name = f"{node_label(source)}_adapt"
        while True:
            try:
                gm.get_submodule(name)
            except AttributeError:
                break
            name += "_"
        pool = ADAPTIVE_AVG[len(size)](size)
        pool.training = gm.training
        gm.add_submodule(name, pool)
        with gm.graph.inserting_after(source):
            new = gm.graph.call_module(name, (source,))
        child.replace_input_with(source, new)
        gm.recompile()

    return adapt


@overload
def convert(
    model: nn.Module,
    input_size: Sequence[int] = (224, 224),
    *,
    placement: str = "post",
    init_scale: float | Sequence[float] | None = None,
    overrides: Mapping[str, float | Sequence[float]] | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
    leaf_modules: Sequence[LeafSpec] = (),
    patchify: str = "post",
    head: str = "none",
    source: Any = None,
    check: bool = True,
    submodule: None = None,
    anchors: str | None = None,
) -> tuple[fx.GraphModule, ConversionReport]: ...


@overload
def convert(
    model: nn.Module,
    input_size: Sequence[int] = (224, 224),
    *,
    placement: str = "post",
    init_scale: float | Sequence[float] | None = None,
    overrides: Mapping[str, float | Sequence[float]] | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
    leaf_modules: Sequence[LeafSpec] = (),
    patchify: str = "post",
    head: str = "none",
    source: Any = None,
    check: bool = True,
    submodule: str,
    anchors: str | None = None,
) -> tuple[nn.Module, ConversionReport]: ...


def convert(
    model: nn.Module,
    input_size: Sequence[int] = (224, 224),
    *,
    placement: str = "post",
    init_scale: float | Sequence[float] | None = None,
    overrides: Mapping[str, float | Sequence[float]] | None = None,
    sizes: Sequence[Sequence[int]] | None = None,
    leaf_modules: Sequence[LeafSpec] = (),
    patchify: str = "post",
    head: str = "none",
    source: Any = None,
    check: bool = True,
    submodule: str | None = None,
    anchors: str | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Replace every resizing op of ``model`` by a DynOPool of its dimension (paper 4.4, supplement 1.1).

    The caller's model is not modified. Scales of DynOPools whose outputs must keep equal
    resolutions are tied: the converted graph runs on the meta device with every tie group's
    scale moved on its own (both axes, up and down), ops that then fail tie the groups that
    meet there, until a run is clean (see :mod:`dynoswap.engine.tie`). At ``input_size`` and
    the default scales every DynOPool reproduces the original op's output size (ceil_mode,
    odd sizes and padding included). Each module keeps its training flag, requires_grad,
    device and dtype.

    Args:
        model: A torchvision/timm/user CNN: 2-D, or 1-D / 3-D (audio, video) with ``input_size`` of 1 or 3 sides.
        input_size: (H, W) the model is meant for, (L,) for a 1-D model, (T, H, W) for a 3-D one; its
            length is the dimension of the DynOPools; sizes and ``sizes=`` targets refer to it.
        placement: ``"post"`` (DynOPool after the conv's activation, supp. eq. 2) or ``"pre"``
            (before the conv, supp. eq. 3, for dense prediction).
        init_scale: One initial scale for every DynOPool, instead of 1/stride.
        overrides: Initial scale per DynOPool or per replaced node name.
        sizes: Target output size per tie group (one value per axis), in execution order at ``input_size``.
        leaf_modules: Modules to keep opaque (classes or qualified names), e.g. untraceable ones.
        patchify: ``"post"`` converts kernel == stride convs like other strided convs; ``"skip"`` keeps them.
        head: ``"none"`` refuses a flatten of a spatial map into a Linear (its size is fixed);
            ``"adapt"`` inserts an adaptive average pool (``nn.AdaptiveAvgPool2d(original size)`` in 2-D)
            before the flatten.
        source: ``ModelSource`` (or its dict) the model was built from; needed by ``dynoswap.save``.
        check: With ``init_scale``/``overrides``/``sizes``, run the moved-scale check again at those scales.
        submodule: Convert only this part (a dotted path such as ``"backbone"``), at its own
            ``input_size``, in a copy of ``model`` (see :mod:`dynoswap.engine.submodule`).
        anchors: With ``submodule``, how a torchvision detector's anchor generators and RoI poolers
            compute strides: ``"float"`` (the default: they follow the learned sizes) or ``"integer"``
            (torchvision's).

    Returns:
        The converted GraphModule and its ConversionReport; with ``submodule``, the whole model
        (the part a GraphModule in place, the recipe in its ``meta`` dict) and the part's report.

    Raises:
        TraceError: the model cannot be traced (names the module, the line and the fix).
        TieError: resolutions cannot be kept equal, or the result breaks when scales move; its
            ``category`` says why (fixed position embedding, fixed-size head, ...) and ``node`` where.
        ConversionError: resizes more axes than ``input_size`` has, already converted, or fails at ``input_size``.
        OptionError: bad options (names, sizes, scales); a ``ValueError``.
    """
    if submodule is not None:
        return convert_part(
            model,
            submodule,
            input_size,
            anchors=anchors,
            source=source,
            placement=placement,
            init_scale=init_scale,
            overrides=overrides,
            sizes=sizes,
            leaf_modules=leaf_modules,
            patchify=patchify,
            head=head,
            check=check,
        )
    if anchors is not None:
        raise OptionError("anchors applies to a converted part (submodule=...): a whole-model conversion has none")
    # Misuse (a model name, input_size (64.5, 64) or (True, True), sizes below 2) fails here.
    size = check_convert_args(model, input_size, sizes)
    ndim = len(size)
    if head not in HEADS:
        raise OptionError(f"head must be one of {HEADS}, got {head!r}")
    leaf_modules = tuple(leaf_modules)
    _refuse_unsupported(model, len(size))
    model = copy.deepcopy(model)
    try:
        views = _trace_modes(model, leaf_modules)
    except TraceError as err:
        raise with_part_hint(err, model) from err.__cause__
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    in_chans = infer_in_chans(views[0], ndim=ndim)  # the first conv it runs, as for the converted model's cost
    pools: dict[str, DynOPoolNd] = {}
    modes = ["training", "eval"] if len(views) == 2 else [None]
    plans = [
        _prepare(view, size, in_chans, device, placement, patchify, pools, mode)
        for view, mode in zip(views, modes, strict=True)
    ]
    for view, plan in zip(views, plans, strict=True):  # after every graph's shapes: the rewrite changes modules
        apply_sites(view, plan.sites, {s.index: pools[s.name] for s in plan.sites})
    sites = list(plans[0].sites)
    for plan in plans[1:]:  # sites only the eval-mode graph has
        known = {s.name for s in sites}
        sites += [s for s in plan.sites if s.name not in known]
    exact = {name: e for plan in reversed(plans) for name, e in plan.exact.items()}
    original_out = {name: o for plan in reversed(plans) for name, o in plan.original_out.items()}
    uf = UnionFind([s.name for s in sites])
    finders = [
        TieFinder(
            view,
            [s.name for s in plan.sites],
            {s.name: tuple(1 / r for r in exact[s.name][0]) for s in sites},
            size,
            in_chans,
            device,
            lambda n, view=view: upsample_factor(n, dict(view.named_modules())),  # type: ignore[misc]
            _resizer(view),
            _adapt_head(view) if head == "adapt" else None,
            uf,
        )
        for view, plan in zip(views, plans, strict=True)
    ]
    with eval_mode(model), _at_reference(size, exact):
        pending = list(finders)
        while pending:
            finder = pending.pop(0)
            before = finder.total_unions
            finder.run()
            if finder.total_unions > before:
                pending = [f for f in finders if f is not finder]
    named_groups = finders[0].groups()
    index = {s.name: i for i, s in enumerate(sites)}
    for i, s in enumerate(sites):
        s.index = i
    groups = [[index[n] for n in g] for g in named_groups]
    defaults = {index[n]: exact[g[0]][0] for g in named_groups for n in g}
    scales = _resolve_scales(sites, groups, defaults, init_scale, overrides, ndim)
    for s in sites:
        pools[s.name].set_scale(scales[s.index])
    for g in named_groups:
        for n in g[1:]:
            pools[n].tie_to(pools[g[0]])
    dtype = first.dtype if first is not None and first.dtype == torch.float64 else torch.float32
    for pool in pools.values():
        pool.to(device=device, dtype=dtype)
        pool.training = model.training
    gm = _assemble(model, views)
    if hasattr(model, "feature_info"):  # a timm features_only model: reductions that follow the learned sizes
        from .features import attach_feature_info

        attach_feature_info(model, gm, size)
    by_index = {s.index: pools[s.name] for s in sites}
    if sizes is not None:
        example = torch.zeros(1, in_chans, *size, device=device, dtype=first.dtype if first is not None else None)
        _apply_sizes(gm, by_index, groups, sizes, example)
    if check and sites and (init_scale is not None or overrides or sizes is not None):
        moved = {s.name: pools[s.name].alpha.detach().cpu().tolist() for s in sites}
        with eval_mode(model), _at_reference(size, exact):
            for finder in finders:
                finder.check({name: tuple(float(v) for v in a) for name, a in moved.items()})

    for view in views:
        for node in view.graph.nodes:
            # Shapes were taken before the rewrite and are stale now.
            for key in (SHAPE_KEY, "dynoswap_size_of"):
                node.meta.pop(key, None)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    src = source.to_dict() if hasattr(source, "to_dict") else (dict(source) if source is not None else None)
    name = f"{src['library']}:{src['name']}" if src else type(model).__name__
    crops = [view.meta.pop(RESIZED_CROPS, []) for view in views][0]  # the same crops in every mode's graph
    resized = [*crops, *(r for f in finders for r in f.resized)]
    report = ConversionReport(name, size, placement, resized_to_partner=resized)
    report.adapted_heads = [a for f in finders for a in f.adapted]
    report.global_pools = [a for f in finders for a in f.globalised]
    report.limits = {k: v for f in finders for k, v in f.limits.items()}
    for s in sites:
        was = _was(s.primary)
        scale, note = exact[s.name]
        leader = sites[groups[group_of[s.index]][0]]
        n_in = _spatial_in(s)
        if scales[s.index] != scale:
            note = ""
            if init_scale is None and not overrides and sizes is None and n_in:
                got = pool_size(n_in, tuple(1 / r for r in scales[s.index]))
                if got != original_out[s.name]:
                    note = f"tied to {leader.name}: init output {_shown(got)}, original {original_out[s.name]}"
        report.replacements.append(
            Replacement(
                name=s.primary.name,
                was={k: was[k] for k in ("op", "stride", "kernel", "padding", "ceil_mode")},
                rule=s.rule,
                dynopool=s.name,
                init_scale=scales[s.index] if pools[s.name].alpha.is_meta else pools[s.name].scale,
                group=group_of[s.index] + 1,  # numbered from 1, as in every table and plot
                merged=[_was(m) for m in s.merged],
                cost_note=COST_NOTES.get(s.rule, ""),
                original_out=original_out[s.name],
                note=note,
            )
        )
    kept = [k for plan in plans[:1] for k in plan.kept]
    skips = [k for plan in plans[:1] for k in plan.skips]
    report.skipped = [Skipped(r.name, r.op, reason) for r, reason in kept] + [
        Skipped(k.name, k.op, k.reason) for k in skips
    ]
    report.groups = named_groups
    rows = report.to_dict()
    gm.meta[RECIPE_KEY] = Recipe(
        source=ModelSource.from_dict(src) if src else None,
        input_size=size,
        options=RecipeOptions(
            placement=placement,
            init_scale=_axes(init_scale, "init_scale", ndim) if init_scale is not None else None,
            overrides={k: _axes(v, k, ndim) for k, v in (overrides or {}).items()},
            sizes=[tuple(int(a) for a in _axes(v, "sizes", ndim)) for v in sizes] if sizes is not None else None,
            leaf_modules=[_leaf_to_json(s) for s in leaf_modules],
            patchify=patchify,
            head=head,
        ),
        replacements=rows["replacements"],
        skipped=rows["skipped"],
        groups=report.groups,
        version=__version__,
    ).to_dict()
    return gm, report
