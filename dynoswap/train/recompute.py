"""Recompute the high-resolution segments of rule (2) in backward instead of keeping them.

Rule (2) (``ReLU o Conv_s -> DynOPool o ReLU o Conv_1``, placement ``post``) runs a
former strided conv, its norm and its activation at the input's resolution: about
``s_h * s_w`` times the pixels of the original. Their activations are what autograd
keeps for backward, so a converted model needs more memory than the original.

:func:`recompute_view` returns a *training view* of a converted model: a GraphModule
that shares every module and parameter with the model (same state-dict keys, same
alphas, same optimiser) but runs each ``conv -> norm -> activation -> DynOPool`` chain
of a post-placed DynOPool under :func:`torch.utils.checkpoint.checkpoint`: only the
chain's (low-resolution) input is kept, and the chain runs again in backward. The
DynOPool belongs to the chain because its input is the chain's largest tensor. The
converted model is not modified, so saving, cost analysis, freezing and export never
see the view.

Batch-norm running statistics are updated once per step: during the recomputation
their momentum is zero and their batch counter is restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConversionError
from ..layers import DynOPoolNd

#: Rules whose DynOPool follows a conv that now runs at stride 1 (supplement eq. 2).
POST_RULES = ("conv_post", "patchify_post")


@contextlib.contextmanager
def _frozen_norm_stats(norms: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Keep running statistics unchanged while a segment is recomputed."""
    saved = [(m, m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class RecomputeSegment(nn.Module):
    """Runs one chain of nodes under activation checkpointing while training.

    The chain's modules belong to the converted model; the segment holds them without
    registering them, so parameters and state-dict keys are not duplicated.

    Args:
        segment: A GraphModule of the chain (its modules are the model's own objects).
        names: The chain's module paths in the model, for ``extra_repr``.
    """

    def __init__(self, segment: fx.GraphModule, names: list[str]) -> None:
        super().__init__()
        object.__setattr__(self, "_segment", segment)  # not a child: no second copy of its parameters
        self.names: list[str] = names
        self._norms = [m for m in segment.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def forward(self, *args: Any) -> Any:
        """Run the chain; in training with gradients, keep only its inputs for backward."""
        segment: fx.GraphModule = self.__dict__["_segment"]
        if not (self.training and torch.is_grad_enabled()):
            return segment(*args)
        norms = self._norms
        return checkpoint(
            segment,
            *args,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _frozen_norm_stats(norms)),
        )

    def extra_repr(self) -> str:
        """List the recomputed modules."""
        return " -> ".join(self.names)


def _chain(start: fx.Node, stop: fx.Node) -> list[fx.Node] | None:
    """Return the nodes from ``start`` up to the one feeding ``stop``, each used only by the next (None if not)."""
    chain = [start]
    node = start
    while True:
        users = list(node.users)
        if len(users) != 1:
            return None
        if users[0] is stop:
            return chain
        node = users[0]
        chain.append(node)


def _segment_module(gm: fx.GraphModule, chain: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """Build a GraphModule running ``chain``; also return the outside nodes it reads, in placeholder order."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outside: list[fx.Node] = []

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            outside.append(a)
            env[a] = graph.placeholder(f"in_{len(outside)}")
        return env[a]

    for node in chain:
        env[node] = graph.node_copy(node, arg)
    graph.output(env[chain[-1]])
    return fx.GraphModule(_owned(gm, chain), graph), outside


def _owned(gm: fx.GraphModule, nodes: list[fx.Node]) -> dict[str, Any]:
    """Collect the model's modules and attributes that ``nodes`` call or read, by their paths."""
    root: dict[str, Any] = {}
    for n in nodes:
        if n.op in ("call_module", "get_attr"):
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            root[str(n.target)] = obj
    return root


def inflated_chains(model: fx.GraphModule) -> list[tuple[list[fx.Node], fx.Node]]:
    """Find each post-placed DynOPool's chain: the nodes from its stride-1 conv up to the DynOPool.

    Returns:
        ``(chain, dynopool_node)`` pairs; the chain starts at the conv and ends at the node feeding
        the DynOPool, each node used only by the next.
    """
    recipe = model.meta.get("dynoswap") or {}
    by_target = {n.target: n for n in model.graph.nodes if n.op == "call_module"}
    found = []
    for rep in recipe.get("replacements", []):
        if rep.get("rule") not in POST_RULES:
            continue
        start, stop = by_target.get(rep["name"]), by_target.get(rep["dynopool"])
        if start is None or stop is None or not isinstance(model.get_submodule(str(stop.target)), DynOPoolNd):
            continue
        chain = _chain(start, stop)
        if chain is not None:
            found.append((chain, stop))
    return found


def recompute_view(model: nn.Module) -> fx.GraphModule:
    """Build a training view of a converted model that recomputes rule (2)'s high-resolution segments.

    Args:
        model: A GraphModule from :func:`dynoswap.convert` (placement ``post``).

    Returns:
        A GraphModule sharing every module and parameter with ``model``; forward gives the
        same outputs and gradients, with less kept for backward. Train the view, and give
        ``model`` to the GMACs loss, saving and export.

    Raises:
        ConversionError: ``model`` is not a converted GraphModule.
    """
    if not isinstance(model, fx.GraphModule) or not isinstance(model.meta.get("dynoswap"), dict):
        raise ConversionError("recompute_view needs a model returned by dynoswap.convert")
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    root: dict[str, Any] = {}
    in_segment: dict[fx.Node, tuple[list[fx.Node], int]] = {}
    segments: list[tuple[RecomputeSegment, list[fx.Node]]] = []
    for chain, stop in inflated_chains(model):
        chain.append(stop)  # the DynOPool too: its input is the largest tensor of the segment
        segment, outside = _segment_module(model, chain)
        names = [str(n.target) for n in chain if n.op == "call_module"]
        segments.append((RecomputeSegment(segment, names), outside))
        for node in chain:
            in_segment[node] = (chain, len(segments) - 1)
    for node in model.graph.nodes:
        if node in in_segment:
            chain, index = in_segment[node]
            if node is not chain[-1]:
                continue
            module, outside = segments[index]
            name = f"_recompute_{index}"
            root[name] = module
            env[node] = graph.call_module(name, tuple(env[a] for a in outside))
            continue
        root.update(_owned(model, [node]))
        env[node] = graph.node_copy(node, lambda a: env[a])
    view = fx.GraphModule(root, graph, class_name=type(model).__name__)
    for wrapper, _ in segments:
        # Register the recomputed modules at their own paths too, so the view's parameters,
        # buffers and state-dict keys are the model's (DDP and optimisers see every weight).
        for name in wrapper.names:
            if name not in dict(view.named_modules()):
                view.add_submodule(name, model.get_submodule(name))
    view.training = model.training  # the view's own flag only: each module keeps its own
    return view


@contextlib.contextmanager
def saved_activation_bytes(model: nn.Module) -> Iterator[list[int]]:
    """Measure the activations autograd keeps for backward inside the block (weights excluded).

    Bytes of the distinct storages saved by autograd, less the model's own parameters and
    buffers: the memory a training step needs beyond the model.

    Args:
        model: Its parameters and buffers are not counted.

    Yields:
        A one-element list that holds the byte count when the block ends.
    """
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    result = [0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    result[0] = sum(storages.values())
