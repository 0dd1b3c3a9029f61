"""Rules that replace resizers by DynOPool (1-d, 2-d or 3-d, as the resizer), and merging of consecutive resizers.

Rules (paper 4.4, supplement 1.1):

* ``pool``: Pool_s -> DynOPool with init scale 1/s (supp. eq. 1); the pool is removed.
* ``conv_post``: ReLU o Conv_s -> DynOPool_s o ReLU o Conv_1 (supp. eq. 2); the DynOPool goes
  after the norm/activation that follows the conv (or after the conv and its norm when no
  activation follows).
* ``conv_pre``: Conv_s -> Conv_1 o DynOPool_s (supp. eq. 3).
* ``patchify_post``: a conv whose kernel equals its stride, handled like ``conv_post``.

Pools reached from a site through size-preserving ops only are merged into it (init scale
multiplied): ResNet's stem conv_s2 -> bn -> relu -> maxpool_s2 is one DynOPool at 0.25. So is a
strided conv that resizes only axes the site does not (a factorised conv: R(2+1)D's (1, 2, 2)
spatial conv, then its (2, 1, 1) temporal one is one DynOPool at 0.5 per axis).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..display import DYNOPOOL_SUFFIX
from ..errors import OptionError
from .find import Resizer, node_label

PLACEMENTS = ("post", "pre")
PATCHIFY = ("post", "skip")


# -- size-preserving ops (walked through when placing and merging) -------------
SIZE_PRESERVING_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
# Modules from these packages are elementwise activations or norm+act blocks.
SIZE_PRESERVING_PACKAGES = (
    "torch.nn.modules.activation",
    "timm.layers.activations",
    "timm.layers.activations_me",
    "timm.layers.norm_act",
    "timm.layers.norm",
)
SIZE_PRESERVING_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
    F.batch_norm,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
}
SIZE_PRESERVING_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clamp", "clamp_"}


def is_size_preserving(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``node`` is a norm, activation, dropout or identity (keeps the spatial size)."""
    if node.op == "call_module":
        m = modules[str(node.target)]
        return isinstance(m, SIZE_PRESERVING_MODULES) or type(m).__module__.startswith(SIZE_PRESERVING_PACKAGES)
    if node.op == "call_function":
        return node.target in SIZE_PRESERVING_FUNCTIONS
    if node.op == "call_method":
        return node.target in SIZE_PRESERVING_METHODS
    return False


# -- making a strided conv run at stride 1 with size-preserving padding ----------
def _stride1_conv(m: nn.modules.conv._ConvNd) -> tuple[int, ...] | None:
    """Any-dimensional conv at stride 1 with 'same' padding; F.pad's (last axis first) padding when uneven."""
    ndim = len(m.kernel_size)
    m.stride = (1,) * ndim
    if getattr(m, "same_pad", False):  # timm Std/ScaledStdConv2dSame pad from stride at run time
        return None
    totals = [d * (k - 1) for k, d in zip(m.kernel_size, m.dilation, strict=True)]
    if not any(t % 2 for t in totals):
        pad = tuple(t // 2 for t in totals)
        m.padding = pad
        if m.padding_mode != "zeros":
            m._reversed_padding_repeated_twice = [p for p in reversed(pad) for _ in (0, 1)]
        return None
    # Even kernel: asymmetric padding (less on the left/top, like padding='same'), done by an F.pad node.
    m.padding = (0,) * ndim
    if m.padding_mode != "zeros":
        m._reversed_padding_repeated_twice = [0] * (2 * ndim)
    return tuple(v for t in reversed(totals) for v in (t // 2, t - t // 2))


def _stride1_conv_dynamic_same(m: nn.Conv2d) -> None:
    m.stride = (1, 1)  # timm Conv2dSame computes 'same' padding from the stride in forward


# Each rule returns explicit F.pad input padding to insert (last axis first), or None.
STRIDE_ONE: dict[type, Callable[[Any], tuple[int, ...] | None]] = dict.fromkeys(
    (nn.Conv1d, nn.Conv2d, nn.Conv3d), _stride1_conv
)


@functools.cache
def _register_timm_convs() -> None:
    # Lazy: importing timm is slow and plain torch models do not need it.
    try:
        from timm.layers.conv2d_same import Conv2dSame
    except ImportError:
        return
    STRIDE_ONE.setdefault(Conv2dSame, _stride1_conv_dynamic_same)


def make_stride_one(gm: fx.GraphModule, node: fx.Node) -> None:
    """Run the conv of ``node`` at stride 1 with padding that keeps the input size."""
    _register_timm_convs()
    m = gm.get_submodule(str(node.target))
    for cls in type(m).__mro__:
        if cls in STRIDE_ONE:
            pad = STRIDE_ONE[cls](m)
            break
    else:
        raise TypeError(f"no stride-1 rule for {type(m).__name__}")
    if pad is not None:
        with gm.graph.inserting_before(node):
            padded = gm.graph.call_function(F.pad, (node.args[0], pad))
        node.args = (padded, *node.args[1:])


# -- planning -----------------------------------------------------------------
@dataclass
class Site:
    """One DynOPool to insert.

    Attributes:
        index: Position in execution order.
        rule: ``pool``, ``conv_post``, ``conv_pre`` or ``patchify_post``.
        primary: The resizer that defines the site (conv or first pool).
        merged: Pools merged into the site (removed).
        anchor: For post/pool rules the DynOPool goes right after this node.
        name: Module path of the DynOPool.
        init_scale: One scale per axis, e.g. (r_h, r_w), before overrides.
    """

    index: int
    rule: str
    primary: Resizer
    merged: list[Resizer] = field(default_factory=list)
    anchor: fx.Node | None = None
    name: str = ""
    init_scale: tuple[float, ...] = (0.5, 0.5)
    aggregate: str = "max"

    @property
    def resizers(self) -> list[Resizer]:
        """Primary and merged resizers."""
        return [self.primary, *self.merged]


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].args and users[0].args[0] is node:
        return users[0]
    return None


def _strided_axes(resizers: list[Resizer]) -> set[int]:
    return {axis for r in resizers for axis, s in enumerate(r.stride) if s != 1}


def _walk(
    start: fx.Node,
    pools: dict[fx.Node, Resizer],
    modules: dict[str, nn.Module],
    taken: set[fx.Node],
    convs: dict[fx.Node, Resizer] | None = None,
    first: Resizer | None = None,
) -> tuple[fx.Node, list[Resizer]]:
    """From ``start``, follow single-user size-preserving ops; return (last op before a pool, pools met).

    With ``convs``, a strided conv met on the way that resizes only axes the site does not yet resize
    is merged too (a factorised conv, R(2+1)D's spatial then temporal stride): it runs at stride 1 and
    the site's DynOPool goes after it and its activation, so a residual block keeps one DynOPool per
    branch, which tying can equate with its shortcut's.
    """
    node, anchor, merged = start, start, []
    pool_met = False
    while True:
        nxt = _single_user(node)
        if nxt is None:
            break
        if nxt in pools and nxt not in taken:
            merged.append(pools[nxt])
            taken.add(nxt)
            pool_met = True
        elif (
            convs is not None
            and first is not None
            and nxt in convs
            and nxt not in taken
            and not _strided_axes([convs[nxt]]) & _strided_axes([first, *merged])
        ):
            merged.append(convs[nxt])
            taken.add(nxt)
            anchor, pool_met = nxt, False
        elif is_size_preserving(nxt, modules):
            if not pool_met:
                anchor = nxt
        else:
            break
        node = nxt
    return anchor, merged


def _scale(resizers: list[Resizer]) -> tuple[float, ...]:
    return tuple(math.prod(1.0 / r.stride[axis] for r in resizers) for axis in range(len(resizers[0].stride)))


def plan_sites(
    gm: fx.GraphModule, resizers: list[Resizer], placement: str, patchify: str
) -> tuple[list[Site], list[tuple[Resizer, str]]]:
    """Group resizers into DynOPool sites.

    Returns:
        The sites in execution order and the resizers left alone with their reason.
    """
    if placement not in PLACEMENTS:
        raise OptionError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    if patchify not in PATCHIFY:
        raise OptionError(f"patchify must be one of {PATCHIFY}, got {patchify!r}")
    modules = dict(gm.named_modules())
    pools = {r.node: r for r in resizers if r.kind == "pool"}
    convs = {r.node: r for r in resizers if r.kind == "conv"}
    taken: set[fx.Node] = set()
    sites: list[Site] = []
    kept: list[tuple[Resizer, str]] = []
    for r in resizers:
        if r.node in taken:
            continue
        taken.add(r.node)
        if r.kind == "patchify" and patchify == "skip":
            kept.append((r, "patchify conv (kernel == stride) kept: patchify='skip'"))
            continue
        site = Site(len(sites), "pool", r, aggregate=r.aggregate)
        if r.kind == "pool":
            _, site.merged = _walk(r.node, pools, modules, taken)
        elif placement == "pre":
            site.rule = "conv_pre" if r.kind == "conv" else "patchify_pre"
        else:
            site.rule = "conv_post" if r.kind == "conv" else "patchify_post"
            site.anchor, site.merged = _walk(r.node, pools, modules, taken, convs if r.kind == "conv" else None, r)
        site.init_scale = _scale(site.resizers)
        site.name = f"{node_label(r.node)}{DYNOPOOL_SUFFIX}"
        sites.append(site)
    _dedupe_names(sites)
    return sites, kept


def _dedupe_names(sites: list[Site]) -> None:
    seen: dict[str, int] = {}
    for site in sites:
        count = seen.get(site.name, 0)
        seen[site.name] = count + 1
        if count:
            site.name = f"{site.name}{count}"


# -- applying -----------------------------------------------------------------
def apply_sites(gm: fx.GraphModule, sites: list[Site], modules_by_site: Mapping[int, nn.Module]) -> None:
    """Insert each site's DynOPool module into ``gm`` and remove the replaced pools."""
    graph = gm.graph
    computed = computed_sizes(gm, sites)
    for site in sites:
        gm.add_submodule(site.name, modules_by_site[site.index])
        primary = site.primary.node
        if site.rule == "pool":
            with graph.inserting_before(primary):
                new = graph.call_module(site.name, (primary.args[0],))
            _copy_meta(primary, new)
            primary.replace_all_uses_with(new)
            graph.erase_node(primary)
        elif site.rule.endswith("_pre"):
            with graph.inserting_before(primary):
                new = graph.call_module(site.name, (primary.args[0],))
            primary.args = (new, *primary.args[1:])
            make_stride_one(gm, primary)
        else:
            make_stride_one(gm, primary)
            anchor = site.anchor
            assert anchor is not None
            with graph.inserting_after(anchor):
                new = graph.call_module(site.name, (anchor,))
            _copy_meta(anchor, new)
            anchor.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)  # type: ignore[misc]
        for merged in site.merged:
            node = merged.node
            if merged.kind == "conv":  # a factorised conv's second stride: it runs at stride 1 too
                make_stride_one(gm, node)
                continue
            source = node.args[0]
            assert isinstance(source, fx.Node)
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    gm.meta[RESIZED_CROPS] = resize_cropped_upsamplings(gm, {s.name for s in sites})
    follow_computed_sizes(gm, computed)
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()


def _copy_meta(src: fx.Node, dst: fx.Node) -> None:
    for key in ("nn_module_stack", "stack_trace"):
        if key in src.meta:
            dst.meta[key] = src.meta[key]


# -- fixed-factor upsampling feeding a merge -> resize to the partner's size -----------
def upsample_factor(node: fx.Node, modules: dict[str, nn.Module]) -> dict[str, Any] | None:
    """Interpolation options of a fixed-factor upsampling node, else None."""
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Upsample):
        m = modules[str(node.target)]
        if m.scale_factor is None:
            return None
        return {"mode": m.mode, "align_corners": m.align_corners}
    if node.op == "call_function" and node.target is F.interpolate:
        if node.kwargs.get("scale_factor") is None and (len(node.args) < 3 or node.args[2] is None):
            return None
        mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
        align = node.kwargs.get("align_corners", node.args[4] if len(node.args) > 4 else None)
        return {"mode": mode, "align_corners": align}
    return None


def resize_to_partner(gm: fx.GraphModule, upsample: fx.Node, partner: fx.Node, options: dict[str, Any]) -> fx.Node:
    """Replace ``upsample`` by ``F.interpolate(x, size=partner.shape[2:], same mode)``."""
    graph = gm.graph
    with graph.inserting_before(upsample):
        shape = graph.call_function(getattr, (partner, "shape"))
        size = graph.call_function(operator.getitem, (shape, slice(2, None)))
        kwargs = {"size": size, "mode": options["mode"]}
        if options.get("align_corners") is not None:
            kwargs["align_corners"] = options["align_corners"]
        new = graph.call_function(F.interpolate, (upsample.args[0],), kwargs)
    new.meta.update(upsample.meta)
    new.meta["dynoswap_size_of"] = partner
    upsample.replace_all_uses_with(new)
    graph.erase_node(upsample)
    return new


# -- a learned upsampling cropped to a size computed at run time -> resized to that size ----------
#: Learned upsamplings whose output a block crops back to its input's size (timm LowFormer's attention).
TRANSPOSED_CONVS: tuple[type[nn.modules.conv._ConvTransposeNd], ...] = (
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
#: ``gm.meta`` key: crops rewritten by :func:`resize_cropped_upsamplings`, by node label.
RESIZED_CROPS = "dynoswap_resized_crops"
#: The (multi)linear interpolation mode of each number of spatial axes.
LINEAR = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _crop_stops(node: fx.Node, modules: dict[str, nn.Module]) -> list[Any] | None:
    """Return the stops of ``up(x)[..., :H, :W]`` (a strided transposed conv's output cropped), else None."""
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    source, index = node.args
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return None
    up = modules.get(str(source.target))
    if not isinstance(up, TRANSPOSED_CONVS):
        return None
    stride: tuple[int, ...] = tuple(up.stride)
    items: list[Any] = list(index) if isinstance(index, tuple) else [index]
    if all(s == 1 for s in stride) or not items or items[0] is not Ellipsis or len(items) != 1 + len(stride):
        return None
    if not all(isinstance(i, slice) and i.start is None and i.step is None for i in items[1:]):
        return None
    stops = [i.stop for i in items[1:]]
    return stops if any(isinstance(v, fx.Node) for v in stops) else None


def _after_pool(node: fx.Node, pools: set[str]) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module" and str(n.target) in pools:
            return True
        todo.extend(n.all_input_nodes)
    return False


def resize_cropped_upsamplings(gm: fx.GraphModule, pools: set[str]) -> list[str]:
    """Follow each crop of a learned upsampling after a DynOPool by a resize to the crop's own size.

    A block that pools inside (a strided conv, now a DynOPool), upsamples back with a strided transposed
    conv and crops to its input's size, ``up(x)[..., :H, :W]``, only gets (H, W) back while the pooled map
    keeps its conversion-time size. ``F.interpolate(crop, size=(H, W))`` ((bi/tri)linear) gets it back at
    any scale and is the identity at the conversion's scales, where the crop already is (H, W).

    Returns:
        The labels of the crops resized.
    """
    modules = dict(gm.named_modules())
    done = []
    for node in list(gm.graph.nodes):
        stops = _crop_stops(node, modules)
        if stops is None or not _after_pool(node, pools):
            continue
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(
                F.interpolate, (node,), {"size": tuple(stops), "mode": LINEAR[len(stops)], "align_corners": False}
            )
        _copy_meta(node, new)
        node.replace_all_uses_with(new, delete_user_cb=lambda user, new=new: user is not new)
        done.append(node_label(node))
    return done


# -- a size the model computes as input // stride -> the DynOPool's output size ------------------
#: The ways a traced model reads a map's shape: ``x.shape`` and ``x.size()``.
_SHAPE_READS = (("call_function", getattr), ("call_method", "size"))


def _input_side(node: fx.Node, source: fx.Node, ndim: int) -> int | None:
    """Return the spatial axis (counted from the end) of ``source``'s shape that ``node`` reads, else None.

    ``source.shape[2]`` and ``source.size()[-2]`` read axis -2 of a 2-D map (``ndim`` spatial axes after N, C).
    """
    if node.op != "call_function" or node.target is not operator.getitem or len(node.args) != 2:
        return None
    shape, index = node.args
    if not isinstance(shape, fx.Node) or not isinstance(index, int) or shape.args[:1] != (source,):
        return None
    if (shape.op, shape.target) == ("call_function", getattr) and shape.args[1:] != ("shape",):
        return None
    if (shape.op, shape.target) not in _SHAPE_READS or len(shape.args) != (2 if shape.op == "call_function" else 1):
        return None
    side = index - (ndim + 2) if index >= 0 else index
    return side if -ndim <= side <= -1 else None


def computed_sizes(gm: fx.GraphModule, sites: list[Site]) -> list[tuple[str, fx.Node, int]]:
    """Sizes a model computes from a resizer's input as ``side // stride``: what the resizer's output had.

    timm's Twins patch embedding returns ``(H // p, W // p)`` beside its conv's output, and its attention
    reshapes the tokens to that grid. Found before the rewrite (a pool's node goes away); sites that merged
    pools are left out (their DynOPool stands for several strides).

    Returns:
        (DynOPool name, the ``floordiv`` node, axis) per computed size.
    """
    found = []
    for site in sites:
        if site.merged or not site.primary.node.args or not isinstance(site.primary.node.args[0], fx.Node):
            continue
        source = site.primary.node.args[0]
        for read in [u for shape in source.users for u in shape.users]:
            side = _input_side(read, source, len(site.primary.stride))
            if side is None:
                continue
            stride = site.primary.stride[side]
            for user in read.users:
                if user.op == "call_function" and user.target is operator.floordiv and user.args == (read, stride):
                    found.append((site.name, user, side))
    return found


def follow_computed_sizes(gm: fx.GraphModule, computed: list[tuple[str, fx.Node, int]]) -> None:
    """Make each computed size read its DynOPool's output size instead (the same number at the default scales)."""
    pools = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    for name, node, side in computed:
        pool = pools[name]
        with gm.graph.inserting_after(pool):
            shape = gm.graph.call_function(getattr, (pool, "shape"))
        with gm.graph.inserting_after(shape):
            size = gm.graph.call_function(operator.getitem, (shape, side))
        node.replace_all_uses_with(size)
        gm.graph.erase_node(node)
