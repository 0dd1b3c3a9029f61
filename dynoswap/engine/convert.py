"""convert(): trace -> find -> rewrite -> tie -> GraphModule + ConversionReport."""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from ..layers import DynOPool2d
from ..version import __version__
from .find import Resizer, find_resizers, node_label
from .report import ConversionError, ConversionReport, Replacement, Skipped
from .rewrite import Site, apply_sites, plan_sites, resize_to_partner, upsample_factor
from .tie import Resolver, find_merge_upsamples
from .trace import LeafSpec, trace

RECIPE_KEY = "dynoswap"
SHAPE_KEY = "dynoswap_shape"
COST_NOTES = {
    "conv_post": "conv now runs at stride 1 before the DynOPool: its cost grows by stride_h * stride_w",
    "patchify_post": "patchify conv now runs at stride 1 ('same' padding): its cost grows by stride_h * stride_w",
}
# Modules that keep their input's shape, answered without running them on meta tensors.
META_SHORTCUTS: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Identity,
    nn.Dropout,
)
# Probe factors on (alpha_h, alpha_w): move both axes, differently, to expose fixed-size assumptions.
PROBE_FACTORS = (1.1, 1.05)


def _pair(value: Any, what: str) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return float(value), float(value)
    values = tuple(value)
    if len(values) != 2:
        raise ValueError(f"{what} must be a number or an (h, w) pair, got {value!r}")
    return float(values[0]), float(values[1])


def _check_scale(value: Any, what: str) -> tuple[float, float]:
    pair = _pair(value, what)
    if not all(math.isfinite(v) and v > 0 for v in pair):
        raise ValueError(f"{what} must be finite and > 0, got {value!r}")
    return pair


def _in_channels(model: nn.Module) -> int:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


@contextlib.contextmanager
def _on_meta(gm: fx.GraphModule) -> Iterator[None]:
    """Swap every parameter and buffer for a meta tensor (DynOPool alphas stay: sizes need values)."""
    saved: list[tuple[dict, str, torch.Tensor]] = []
    for module in gm.modules():
        if isinstance(module, DynOPool2d):
            continue
        for store in (module._parameters, module._buffers):
            for key, t in store.items():
                if t is None:
                    continue
                saved.append((store, key, t))
                meta = t.detach().to("meta")
                store[key] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        yield
    finally:
        for store, key, t in saved:
            store[key] = t


class _Runner(fx.Interpreter):
    """Interpreter that names the failing node and, optionally, records output shapes."""

    def __init__(self, gm: fx.GraphModule, record: bool = False) -> None:
        super().__init__(gm)
        self.record = record

    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        module = self.fetch_attr(target)
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.is_meta:
            if isinstance(module, DynOPool2d):
                # The layer samples at data positions; on meta only its size rule matters.
                return x.new_empty((*x.shape[:-2], *module.output_size(tuple(x.shape[-2:]))))
            if isinstance(module, META_SHORTCUTS):
                return x.new_empty(x.shape)  # norms/activations keep the shape; their meta kernels are slow
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except Exception as err:
            if not hasattr(err, "_dynoswap_node"):
                err._dynoswap_node = node_label(n)  # type: ignore[attr-defined]
            raise
        if self.record and isinstance(out, torch.Tensor):
            n.meta[SHAPE_KEY] = tuple(out.shape)
        return out


def _run(interpreter: fx.Interpreter, example: torch.Tensor) -> Any:
    """Run on meta tensors (no compute) and fall back to a real eval-mode forward."""
    gm = interpreter.module
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            try:
                with _on_meta(gm):
                    return interpreter.run(example.to("meta"))
            except Exception:  # an op without a meta kernel or data-dependent Python: compute for real
                return interpreter.run(example)
    finally:
        gm.train(was_training)


def _propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Record each tensor node's output shape in ``node.meta['dynoswap_shape']``."""
    try:
        _run(_Runner(gm, record=True), example)
    except Exception as err:
        where = getattr(err, "_dynoswap_node", "?")
        raise ConversionError(
            f"the traced model fails on a {tuple(example.shape)} input at '{where}' ({err}); check input_size"
        ) from None


def _leaf_to_json(spec: LeafSpec) -> str:
    return f"class:{spec.__module__}:{spec.__qualname__}" if isinstance(spec, type) else str(spec)


def leaf_from_json(text: str) -> LeafSpec:
    """Inverse of the recipe's leaf encoding (``class:module:qualname`` or a submodule name)."""
    if not text.startswith("class:"):
        return text
    _, module, qualname = text.split(":", 2)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _site_keys(site: Site) -> set[str]:
    return {site.name, site.primary.name}


def _resolve_scales(
    sites: list[Site],
    groups: list[list[int]],
    init_scale: Any,
    overrides: Mapping[str, Any] | None,
) -> dict[int, tuple[float, float]]:
    """Pick the initial (r_h, r_w) per site: rule default, then global, then per-name overrides; one per group."""
    scales = {s.index: s.init_scale for s in sites}
    if init_scale is not None:
        pair = _check_scale(init_scale, "init_scale")
        scales = dict.fromkeys(scales, pair)
    chosen: dict[int, tuple[float, float]] = {}
    if overrides:
        by_key = {key: s for s in sites for key in _site_keys(s)}
        merged_into = {m.name: s.name for s in sites for m in s.merged}
        for key, value in overrides.items():
            if key in merged_into:
                raise ValueError(
                    f"override '{key}': that resizer was merged into '{merged_into[key]}'; "
                    f"override '{merged_into[key]}' instead"
                )
            if key not in by_key:
                names = ", ".join(s.name for s in sites[:6])
                raise ValueError(
                    f"override '{key}' names no replaced resizer; use a DynOPool name or the node it replaces "
                    f"(e.g. {names}{', ...' if len(sites) > 6 else ''})"
                )
            chosen[by_key[key].index] = _check_scale(value, f"override '{key}'")
    out: dict[int, tuple[float, float]] = {}
    for group in groups:
        picked = {chosen[i] for i in group if i in chosen}
        if len(picked) > 1:
            names = ", ".join(sites[i].name for i in group)
            raise ValueError(f"overrides disagree within one tie group ({names}): they share one scale")
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
        raise ValueError(f"sizes has {len(sizes)} entries but the model has {len(groups)} tie groups (one per alpha)")
    targets = []
    for i, size in enumerate(sizes):
        pair = _pair(size, f"sizes[{i}]")
        if not all(v >= 1 and float(v).is_integer() for v in pair):
            raise ValueError(f"sizes[{i}] must be positive integers, got {size!r}")
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
    was_training = gm.training
    gm.eval()
    try:
        gm(example)
    finally:
        gm.train(was_training)
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _probe(gm: fx.GraphModule, pools: dict[int, DynOPool2d], groups: list[list[int]], example: torch.Tensor) -> None:
    """Run once with every alpha moved; a model that breaks then is not convertible."""
    leaders = [pools[g[0]] for g in groups]
    saved = [p.alpha.detach().clone() for p in leaders]
    try:
        for p in leaders:
            p.alpha.mul_(torch.tensor(PROBE_FACTORS, dtype=p.alpha.dtype))
        _run(_Runner(gm), example)
    except Exception as err:
        where = getattr(err, "_dynoswap_node", "?")
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(
            f"not convertible: the converted model fails once DynOPool scales move, at '{where}': {cause}"
        ) from None
    finally:
        for p, a in zip(leaders, saved, strict=True):
            p.alpha.copy_(a)


def _original_out(site: Site) -> tuple[int, int] | None:
    """Spatial size the site's resizers produced in the original model (its last merged op's output)."""
    last = site.merged[-1] if site.merged else site.primary
    shape = last.node.meta.get(SHAPE_KEY)
    return (int(shape[-2]), int(shape[-1])) if shape and len(shape) == 4 else None


def _was(r: Resizer) -> dict[str, Any]:
    return {"name": r.name, "op": r.op, "stride": list(r.stride), "kernel": list(r.kernel)}


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
    source: Any = None,
    check: bool = True,
) -> tuple[fx.GraphModule, ConversionReport]:
    """Replace every resizing op of ``model`` by a DynOPool2d (paper 4.4, supplement 1.1).

    The caller's model is not modified. Scales of DynOPools whose outputs must keep equal
    resolutions (residual adds, concatenations, multi-resolution streams) are tied.

    Args:
        model: A torchvision/timm/user CNN.
        input_size: (H, W) the model is meant for; sizes and ``sizes=`` targets refer to it.
        placement: ``"post"`` (DynOPool after the conv's activation, supp. eq. 2) or ``"pre"``
            (before the conv, supp. eq. 3, for dense prediction).
        init_scale: One initial scale for every DynOPool, instead of 1/stride.
        overrides: Initial scale per DynOPool or per replaced node name.
        sizes: Target output size (h, w) per tie group, in execution order at ``input_size``.
        leaf_modules: Modules to keep opaque (classes or qualified names), e.g. untraceable ones.
        patchify: ``"post"`` converts kernel == stride convs like other strided convs; ``"skip"`` keeps them.
        source: ``ModelSource`` (or its dict) the model was built from; needed by ``dynoswap.save``.
        check: Run the converted model once with moved scales and fail if it breaks.

    Returns:
        The converted GraphModule and its ConversionReport.

    Raises:
        TraceError: the model cannot be traced (names the module, the line and the fix).
        ConversionError: resolutions cannot be kept equal, or the result breaks when scales move.
        ValueError: bad options (names, sizes, scales).
    """
    h, w = (int(v) for v in _pair(input_size, "input_size"))
    leaf_modules = tuple(leaf_modules)
    model = copy.deepcopy(model)
    gm = trace(model, leaf_modules)
    first = next(iter(model.parameters()), None)
    # A model built on the meta device converts without allocating weights.
    example = torch.zeros(1, _in_channels(model), h, w, device=first.device if first is not None else "cpu")
    _propagate_shapes(gm, example)
    modules = dict(gm.named_modules())
    resized = []
    for upsample, partner, options in find_merge_upsamples(gm, lambda n: upsample_factor(n, modules)):
        resized.append(node_label(upsample))
        resize_to_partner(gm, upsample, partner, options)
    resizers, skips = find_resizers(gm)
    sites, kept = plan_sites(gm, resizers, placement, patchify)
    resolver = Resolver(
        gm, {s.primary.node: s.index for s in sites}, {m.node for s in sites for m in s.merged}, [s.name for s in sites]
    )
    resolver.run()
    groups = resolver.uf.groups()
    scales = _resolve_scales(sites, groups, init_scale, overrides)
    pools = {s.index: DynOPool2d(scales[s.index], aggregate=s.aggregate) for s in sites}
    original_out = {s.index: _original_out(s) for s in sites}  # read before the rewrite drops the nodes
    apply_sites(gm, sites, pools)
    for group in groups:
        for i in group[1:]:
            pools[i].tie_to(pools[group[0]])
    if sizes is not None:
        _apply_sizes(gm, pools, groups, sizes, example)
    if check and sites:
        _probe(gm, pools, groups, example)

    for node in gm.graph.nodes:
        # Shapes were taken before the rewrite and are stale now.
        for key in (SHAPE_KEY, "dynoswap_size_of"):
            node.meta.pop(key, None)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    src = source.to_dict() if hasattr(source, "to_dict") else (dict(source) if source is not None else None)
    name = f"{src['library']}:{src['name']}" if src else type(model).__name__
    report = ConversionReport(name, (h, w), placement, resized_to_partner=resized)
    for s in sites:
        was = _was(s.primary)
        report.replacements.append(
            Replacement(
                name=s.primary.name,
                was={k: was[k] for k in ("op", "stride", "kernel")},
                rule=s.rule,
                dynopool=s.name,
                init_scale=tuple(pools[s.index].scale),
                group=group_of[s.index],
                merged=[_was(m) for m in s.merged],
                cost_note=COST_NOTES.get(s.rule, ""),
                original_out=original_out[s.index],
            )
        )
    report.skipped = [Skipped(r.name, r.op, reason) for r, reason in kept] + [
        Skipped(k.name, k.op, k.reason) for k in skips
    ]
    report.groups = [[sites[i].name for i in g] for g in groups]
    gm.meta[RECIPE_KEY] = {
        "version": __version__,
        "source": src,
        "input_size": [h, w],
        "options": {
            "placement": placement,
            "init_scale": list(_pair(init_scale, "init_scale")) if init_scale is not None else None,
            "overrides": {k: list(_pair(v, k)) for k, v in (overrides or {}).items()},
            "sizes": [list(_pair(v, "sizes")) for v in sizes] if sizes is not None else None,
            "leaf_modules": [_leaf_to_json(s) for s in leaf_modules],
            "patchify": patchify,
        },
        "replacements": report.to_dict()["replacements"],
        "skipped": report.to_dict()["skipped"],
        "groups": report.groups,
    }
    return gm, report
