"""convert(): trace -> find -> rewrite -> tie -> GraphModule + ConversionReport."""

from __future__ import annotations

import copy
import functools
import inspect
import math
from collections.abc import Mapping, Sequence
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
from ..layers import DynOPool2d, DynOPoolNd
from ..sources import ModelSource
from ..validate import MAX_SCALE, check_convert_args
from ..version import __version__
from .find import Resizer, Skip, find_resizers
from .report import ConversionError, ConversionReport, Replacement, Skipped
from .rewrite import RESIZED_CROPS, Site, apply_sites, plan_sites, resize_to_partner, upsample_factor
from .submodule import convert_part, with_part_hint
from .tie import ALREADY, NOT_2D, TieError, TieFinder
from .trace import LeafSpec, TraceError, readable_cause, trace

SHAPE_KEY = "dynoswap_shape"
#: Layers of other dimensionalities: a model that resizes with them is not a 2-D CNN (one that only
#: uses them at stride 1, as a lambda layer's positional Conv3d, is).
NOT_2D_LAYERS: tuple[type, ...] = (
    nn.Conv3d,
    nn.ConvTranspose3d,
    nn.MaxPool3d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool3d,
)
LAYERS_1D: tuple[type, ...] = (nn.Conv1d, nn.MaxPool1d, nn.AvgPool1d)
LAYERS_2D: tuple[type, ...] = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
COST_NOTES = {
    "conv_post": "conv now runs at stride 1 before the DynOPool: its cost grows by stride_h * stride_w",
    "patchify_post": "patchify conv now runs at stride 1 ('same' padding): its cost grows by stride_h * stride_w",
}


def _pair(value: Any, what: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    values = tuple(value)
    if len(values) != 2:
        raise OptionError(f"{what} must be a number or an (h, w) pair, got {value!r}")
    return float(values[0]), float(values[1])


def _check_scale(value: Any, what: str) -> tuple[float, float]:
    pair = _pair(value, what)
    if not all(math.isfinite(v) and 0 < v <= MAX_SCALE for v in pair):
        raise OptionError(f"{what} must be finite, > 0 and at most {MAX_SCALE:g}, got {value!r}")
    return pair


def _leaf_to_json(spec: LeafSpec) -> str:
    return f"class:{spec.__module__}:{spec.__qualname__}" if isinstance(spec, type) else str(spec)


def _site_keys(site: Site) -> set[str]:
    return {site.name, site.primary.name}


def _resolve_scales(
    sites: list[Site],
    groups: list[list[int]],
    defaults: dict[int, tuple[float, float]],
    init_scale: Any,
    overrides: Mapping[str, Any] | None,
) -> dict[int, tuple[float, float]]:
    """Pick the initial (r_h, r_w) per site: rule default, then global, then per-name overrides; one per group."""
    scales = dict(defaults)
    if init_scale is not None:
        pair = _check_scale(init_scale, "init_scale")
        scales = dict.fromkeys(scales, pair)
    chosen: dict[int, tuple[float, float]] = {}
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
            chosen[by_key[key].index] = _check_scale(value, f"override '{key}'")
    out: dict[int, tuple[float, float]] = {}
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
    pools: dict[int, DynOPool2d],
    groups: list[list[int]],
    sizes: Sequence[Any],
    example: torch.Tensor,
) -> None:
    """Set each group's alpha to n_in / target, group by group in execution order."""
    if len(sizes) != len(groups):
        raise OptionError(f"sizes has {len(sizes)} entries but the model has {len(groups)} tie groups (one per alpha)")
    targets = []
    for i, size in enumerate(sizes):
        pair = _pair(size, f"sizes[{i}]")
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
            h, w = args[0].shape[-2:]
            th, tw = targets[g]
            pools[groups[g][0]].alpha.copy_(torch.tensor([h / th, w / tw]))
            done.add(g)

        handles.append(pool.register_forward_pre_hook(hook))
    try:
        with eval_mode(gm):
            gm(example)
    finally:
        for handle in handles:
            handle.remove()


def _original_out(site: Site) -> tuple[int, int] | None:
    """Spatial size the site's resizers produced in the original model (its last merged op's output)."""
    last = site.merged[-1] if site.merged else site.primary
    shape = last.node.meta.get(SHAPE_KEY)
    return (int(shape[-2]), int(shape[-1])) if shape and len(shape) == 4 else None


def _was(r: Resizer) -> dict[str, Any]:
    return {
        "name": r.name,
        "op": r.op,
        "stride": list(r.stride),
        "kernel": list(r.kernel),
        "padding": list(r.padding) if isinstance(r.padding, tuple) else r.padding,
        "ceil_mode": r.ceil_mode,
    }


def _refuse_unsupported(model: nn.Module) -> None:
    """Already converted models and models that are not 2-D CNNs, refused by name."""
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and RECIPE_KEY in meta or any(isinstance(m, DynOPoolNd) for m in model.modules()):
        raise TieError(
            "this model is already converted (it holds DynOPool layers): train it as it is, or convert the original",
            ALREADY,
        )
    found_2d = False
    first_other = None
    for name, m in model.named_modules():
        if isinstance(m, NOT_2D_LAYERS) and _resizes(m):
            raise TieError(f"dynoswap converts 2-D CNNs; found {type(m).__name__} at {name}", NOT_2D, name)
        found_2d = found_2d or isinstance(m, LAYERS_2D)
        if first_other is None and isinstance(m, LAYERS_1D + NOT_2D_LAYERS):
            first_other = (name, type(m).__name__)
    if not found_2d and first_other is not None:
        raise TieError(
            f"dynoswap converts 2-D CNNs; found {first_other[1]} at {first_other[0]}", NOT_2D, first_other[0]
        )


def _resizes(m: object) -> bool:
    """Whether a conv or pool changes its input's spatial size: an adaptive pool, or a stride above 1."""
    if isinstance(m, (nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)):
        return True
    stride = getattr(m, "stride", 1)
    return any(int(v) != 1 for v in (stride if isinstance(stride, (tuple, list)) else (stride,)))


def _reference_shapes(gm: fx.GraphModule, size: tuple[int, int], in_chans: int, device: torch.device) -> None:
    """Record each tensor node's shape at the conversion input size in ``node.meta['dynoswap_shape']``."""
    try:
        res = analyse(gm, [World(size)], lambda name, m: ((1.0, 1.0), name), in_chans, device)
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


def _spatial_in(site: Site) -> tuple[int, int] | None:
    """Spatial size of the site's input in the original model."""
    arg = site.primary.node.args[0] if site.primary.node.args else None
    shape = arg.meta.get(SHAPE_KEY) if isinstance(arg, fx.Node) else None
    return (int(shape[-2]), int(shape[-1])) if shape and len(shape) == 4 else None


def _exact_scale(site: Site, original: tuple[int, int] | None) -> tuple[tuple[float, float], str]:
    """Return the (r_h, r_w) that reproduces the original output size, and a note when it is not 1/stride."""
    scale = site.init_scale
    n_in = _spatial_in(site)
    if n_in is None or original is None:
        return scale, ""
    if pool_size(n_in, (1 / scale[0], 1 / scale[1])) == original:
        return scale, ""
    alphas = []
    for axis in range(2):
        n, out = n_in[axis], original[axis]
        if out < 2:
            return scale, f"the original gives {original[0]}x{original[1]}; a DynOPool gives at least 2 per axis"
        default = 1 / scale[axis]
        alphas.append(default if pool_size((n, n), (default, default))[0] == out else n / out)
    if any(r.ceil_mode for r in site.resizers):
        why = "ceil_mode"
    elif any(r.padding not in ((0, 0), "valid") for r in site.resizers) or any(
        r.kernel != r.stride for r in site.resizers
    ):
        why = f"padding/kernel on {n_in[0]}x{n_in[1]}"
    else:
        why = f"odd size {n_in[0]}x{n_in[1]}"
    shown = f"{alphas[0]:.5g}" if alphas[0] == alphas[1] else f"{alphas[0]:.5g}x{alphas[1]:.5g}"
    return (1 / alphas[0], 1 / alphas[1]), f"{why}: init alpha {shown} (original output {original[0]}x{original[1]})"


@dataclass
class _Plan:
    """One traced graph, rewritten: its sites, what it kept, and each site's original geometry."""

    sites: list[Site]
    kept: list[tuple[Resizer, str]]
    skips: list[Skip]
    original_out: dict[str, tuple[int, int] | None]
    exact: dict[str, tuple[tuple[float, float], str]]


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
    size: tuple[int, int],
    in_chans: int,
    device: torch.device,
    placement: str,
    patchify: str,
    pools: dict[str, DynOPool2d],
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
    resizers, skips = find_resizers(view)
    sites, kept = plan_sites(view, resizers, placement, patchify)
    original_out = {s.name: _original_out(s) for s in sites}  # read before the rewrite drops the nodes
    exact = {s.name: _exact_scale(s, original_out[s.name]) for s in sites}
    for s in sites:
        if s.name not in pools:
            pools[s.name] = DynOPool2d(exact[s.name][0], aggregate=s.aggregate)
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
    def adapt(source: fx.Node, child: fx.Node, size: tuple[int, int]) -> None:
        name = f"{node_label(source)}_adapt"
        while True:
            try:
                gm.get_submodule(name)
            except AttributeError:
                break
            name += "_"
        pool = nn.AdaptiveAvgPool2d(size)
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
    """Replace every resizing op of ``model`` by a DynOPool2d (paper 4.4, supplement 1.1).

    The caller's model is not modified. Scales of DynOPools whose outputs must keep equal
    resolutions are tied: the converted graph runs on the meta device with every tie group's
    scale moved on its own (both axes, up and down), ops that then fail tie the groups that
    meet there, until a run is clean (see :mod:`dynoswap.engine.tie`). At ``input_size`` and
    the default scales every DynOPool reproduces the original op's output size (ceil_mode,
    odd sizes and padding included). Each module keeps its training flag, requires_grad,
    device and dtype.

    Args:
        model: A torchvision/timm/user 2-D CNN.
        input_size: (H, W) the model is meant for; sizes and ``sizes=`` targets refer to it.
        placement: ``"post"`` (DynOPool after the conv's activation, supp. eq. 2) or ``"pre"``
            (before the conv, supp. eq. 3, for dense prediction).
        init_scale: One initial scale for every DynOPool, instead of 1/stride.
        overrides: Initial scale per DynOPool or per replaced node name.
        sizes: Target output size (h, w) per tie group, in execution order at ``input_size``.
        leaf_modules: Modules to keep opaque (classes or qualified names), e.g. untraceable ones.
        patchify: ``"post"`` converts kernel == stride convs like other strided convs; ``"skip"`` keeps them.
        head: ``"none"`` refuses a flatten of a spatial map into a Linear (its size is fixed);
            ``"adapt"`` inserts ``nn.AdaptiveAvgPool2d(original size)`` before the flatten.
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
        ConversionError: not a 2-D CNN, already converted, or fails at ``input_size``.
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
    h, w = check_convert_args(model, input_size, sizes)
    if head not in HEADS:
        raise OptionError(f"head must be one of {HEADS}, got {head!r}")
    leaf_modules = tuple(leaf_modules)
    _refuse_unsupported(model)
    model = copy.deepcopy(model)
    try:
        views = _trace_modes(model, leaf_modules)
    except TraceError as err:
        raise with_part_hint(err, model) from err.__cause__
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    in_chans = infer_in_chans(views[0])  # the first conv it runs, as for the converted model's cost
    pools: dict[str, DynOPool2d] = {}
    modes = ["training", "eval"] if len(views) == 2 else [None]
    plans = [
        _prepare(view, (h, w), in_chans, device, placement, patchify, pools, mode)
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
            {s.name: (1 / exact[s.name][0][0], 1 / exact[s.name][0][1]) for s in sites},
            (h, w),
            in_chans,
            device,
            lambda n, view=view: upsample_factor(n, dict(view.named_modules())),  # type: ignore[misc]
            _resizer(view),
            _adapt_head(view) if head == "adapt" else None,
            uf,
        )
        for view, plan in zip(views, plans, strict=True)
    ]
    with eval_mode(model):
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
    scales = _resolve_scales(sites, groups, defaults, init_scale, overrides)
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

        attach_feature_info(model, gm, (h, w))
    by_index = {s.index: pools[s.name] for s in sites}
    if sizes is not None:
        example = torch.zeros(1, in_chans, h, w, device=device, dtype=first.dtype if first is not None else None)
        _apply_sizes(gm, by_index, groups, sizes, example)
    if check and sites and (init_scale is not None or overrides or sizes is not None):
        moved = {s.name: pools[s.name].alpha.detach().cpu().tolist() for s in sites}
        with eval_mode(model):
            for finder in finders:
                finder.check({name: (float(a[0]), float(a[1])) for name, a in moved.items()})

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
    report = ConversionReport(name, (h, w), placement, resized_to_partner=resized)
    report.adapted_heads = [a for f in finders for a in f.adapted]
    report.limits = {k: v for f in finders for k, v in f.limits.items()}
    for s in sites:
        was = _was(s.primary)
        scale, note = exact[s.name]
        leader = sites[groups[group_of[s.index]][0]]
        n_in = _spatial_in(s)
        if scales[s.index] != scale:
            note = ""
            if init_scale is None and not overrides and sizes is None and n_in:
                got = pool_size(n_in, (1 / scales[s.index][0], 1 / scales[s.index][1]))
                if got != original_out[s.name]:
                    note = f"tied to {leader.name}: init output {got[0]}x{got[1]}, original {original_out[s.name]}"
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
        input_size=(h, w),
        options=RecipeOptions(
            placement=placement,
            init_scale=_pair(init_scale, "init_scale") if init_scale is not None else None,
            overrides={k: _pair(v, k) for k, v in (overrides or {}).items()},
            sizes=[(int(a), int(b)) for a, b in (_pair(v, "sizes") for v in sizes)] if sizes is not None else None,
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
