"""A converted ResNet-50's training step: time, memory kept for backward, and where the time goes.

Side by side in one run (CPU, ``INPUT`` at batch ``BATCH``): the original model, the
converted model with ``placement="post"`` and ``"pre"``, and the post model trained
through :func:`dynoswap.train.recompute.recompute_view`. Memory is what autograd keeps
for backward (activations; weights excluded), measured with saved-tensor hooks.

The profile splits the converted step's time into: the segments rule (2) inflated (the
former strided convs and the norms/activations between them and their DynOPool),
DynOPool2d itself, the GMACs loss, and the rest. Forward ops are labelled by module
hooks; backward ops inherit the label of the forward op with the same sequence number.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
import torchvision
from torch import fx, nn

from bench.common import Row, median_times

INPUT = (112, 112)
BATCH = 8
LAM = 1.0
CATEGORIES = ("inflated", "dynopool", "gmacs_loss")


def step_fn(
    net: nn.Module, model: nn.Module, converted: bool, input_size: tuple[int, int] = INPUT, batch: int = BATCH
) -> Callable[[], None]:
    """One training step (forward, cross-entropy + lambda * GMACs loss for a converted model, backward, SGD)."""
    from dynoswap import gmacs_loss, param_groups

    # alpha lr 0: sizes stay put, so every repeat times the same network.
    groups = param_groups(model, 0.01, 0.0, 5e-4) if converted else model.parameters()
    opt = torch.optim.SGD(groups, lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, *input_size)
    y = torch.randint(0, 10, (batch,))
    net.train()

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        if converted:
            with torch.autograd.profiler.record_function("cat::gmacs_loss"):
                loss = loss + LAM * gmacs_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _inflated_modules(gm: fx.GraphModule) -> set[str]:
    """Modules between each post-placed DynOPool and the conv that rule (2) made stride 1."""
    from dynoswap.train.recompute import inflated_chains

    return {str(n.target) for chain, _ in inflated_chains(gm) for n in chain if n.op == "call_module"}


@contextmanager
def _labelled(gm: fx.GraphModule) -> Iterator[None]:
    """Label the forward of inflated modules and DynOPools with profiler ranges."""
    from dynoswap.layers import DynOPool2d

    inflated = _inflated_modules(gm)
    handles = []
    for name, m in gm.named_modules():
        label = "cat::dynopool" if isinstance(m, DynOPool2d) else "cat::inflated" if name in inflated else None
        if label is None:
            continue
        stack: list = []

        def pre(_m: nn.Module, _a: tuple, label: str = label, stack: list = stack) -> None:
            rf = torch.autograd.profiler.record_function(label)
            rf.__enter__()
            stack.append(rf)

        def post(_m: nn.Module, _a: tuple, _o: object, stack: list = stack) -> None:
            stack.pop().__exit__(None, None, None)

        handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def profile_shares(gm: fx.GraphModule, step: Callable[[], None], steps: int = 2) -> dict[str, float]:
    """Share of the step's CPU time per category (backward ops follow their forward op's label)."""
    from torch.profiler import ProfilerActivity, profile

    with _labelled(gm), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = list(prof.events())

    def category(evt: object) -> str | None:
        while evt is not None:
            name = evt.name  # type: ignore[attr-defined]
            if name.startswith("cat::"):
                return name[5:]
            evt = evt.cpu_parent  # type: ignore[attr-defined]
        return None

    seq_category: dict[int, str] = {}
    for evt in events:
        cat = category(evt)
        if cat is not None and evt.sequence_nr >= 0 and not evt.name.startswith("autograd::"):
            seq_category.setdefault(evt.sequence_nr, cat)
    times = dict.fromkeys(CATEGORIES, 0.0)
    total = 0.0
    for evt in events:
        if evt.cpu_parent is None:
            total += evt.cpu_time_total
        if evt.name.startswith("cat::") and (evt.cpu_parent is None or category(evt.cpu_parent) is None):
            times[evt.name[5:]] += evt.cpu_time_total
        elif evt.name.startswith("autograd::engine::evaluate_function") and evt.sequence_nr in seq_category:
            times[seq_category[evt.sequence_nr]] += evt.cpu_time_total
    return {k: v / max(total, 1.0) for k, v in times.items()}


def _activation_bytes(net: nn.Module) -> int:
    from dynoswap.train.recompute import saved_activation_bytes

    x = torch.randn(BATCH, 3, *INPUT)
    net.train()
    with saved_activation_bytes(net) as kept:
        loss = net(x).sum()
    loss.backward()
    return kept[0]


def run() -> list[Row]:
    from dynoswap import count_gmacs
    from dynoswap.engine import convert
    from dynoswap.train.recompute import recompute_view

    torch.manual_seed(0)
    original = torchvision.models.resnet50(num_classes=10)
    post, _ = convert(original, INPUT)
    pre, _ = convert(original, INPUT, placement="pre")
    shared = copy.deepcopy(post)
    view = recompute_view(shared)
    nets = {"original": original, "post": post, "pre": pre, "recompute": view}
    steps = {
        "original": step_fn(original, original, False),
        "post": step_fn(post, post, True),
        "pre": step_fn(pre, pre, True),
        "recompute": step_fn(view, shared, True),
    }
    times = median_times(steps, repeats=3, warmup=1)
    memory = {k: _activation_bytes(v) for k, v in nets.items()}
    gmacs = {k: count_gmacs(v, INPUT).total for k, v in (("original", original), ("post", post), ("pre", pre))}
    shares = profile_shares(post, steps["post"])
    where = f"resnet50 {INPUT[0]}x{INPUT[1]} batch {BATCH}, CPU"
    rows = []
    for name in ("post", "pre", "recompute"):
        rows.append(Row("step", f"{name} / original step time ({where})", times[name] / times["original"], "x"))
        if name in gmacs:
            rows.append(Row("step", f"{name} / original GMACs", gmacs[name] / gmacs["original"], "x"))
        rows.append(Row("step", f"{name} / original kept for backward", memory[name] / memory["original"], "x"))
    rows.append(
        Row("step", "recompute / post step time (the price of the memory)", times["recompute"] / times["post"], "x")
    )
    rows.append(Row("step", "original kept for backward", memory["original"] / 2**20, "MiB"))
    for cat in CATEGORIES:
        rows.append(Row("step profile", f"post step share: {cat}", 100 * shares[cat], "%"))
    own = shares["dynopool"] + shares["gmacs_loss"]
    rows.append(
        Row(
            "step profile",
            "post step share: dynoswap's own (DynOPool + GMACs loss)",
            100 * own,
            "%",
            "<= 10%",
            own <= 0.10,
        )
    )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
