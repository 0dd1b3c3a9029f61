"""Deployment: frozen latency / original next to GMACs / original, eager and ONNX Runtime, one run.

For each model and placement, every tie group's alpha is scaled by one common factor until
the converted model costs 0.55x, 0.8x and 1x of the original's GMACs (the factor is found by
bisection on :func:`dynoswap.gmacs_loss`). Each setting is frozen three ways and timed
round-robin against the original in the same run (batch 1, 224x224, CPU, one thread, the
fastest of the repeats: on the shared 2-core machine preemption only ever adds time, and two
threads wait on each other's preemption):

- ``plain``: ``freeze(model, size)`` as before deployment options (batch norm kept, contiguous);
- ``fold``: ``fold_bn=True``;
- ``deploy``: ``fold_bn=True, channels_last=True``, the deployment form.

The original is timed contiguous (as shipped) and in channels_last; "deploy / original" divides
by the contiguous original, "deploy / original CL" by the channels_last one. ONNX Runtime runs
the exported files (``export_model``: frozen, folded, verified) against the original's export.
The goal (issue 18): latency ratio <= 1.25 x GMACs ratio at 0.55x and 0.8x.
"""

from __future__ import annotations

import copy
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision

from bench.common import Row, best_times
from dynoswap import convert, count_gmacs, gmacs_loss
from dynoswap.export import export_model, freeze
from dynoswap.layers import DynOPool2d

SIZE = (224, 224)
BATCH = 1
MODELS = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
LEVELS = (0.55, 0.8, 1.0)
PLACEMENTS = ("post", "pre")
GOAL = 1.25  #: latency ratio / GMACs ratio at the 0.55x and 0.8x levels
REPEATS = int(os.environ.get("DYNOSWAP_BENCH_DEPLOY_REPEATS", "7"))


def set_cost(gm: torch.nn.Module, target: float, original_gmacs: float) -> float:
    """Scale every tie group's alpha by one factor so the model costs ``target`` x the original; return it."""
    leaders = [m for m in gm.modules() if isinstance(m, DynOPool2d) and m.leader is m]
    base = [m.alpha.detach().clone() for m in leaders]

    def cost(factor: float) -> float:
        with torch.no_grad():
            for layer, alpha in zip(leaders, base, strict=True):
                layer.alpha.copy_(alpha * factor)
        return float(gmacs_loss(gm, SIZE).detach()) / original_gmacs

    cost(1.0)  # record the resolution graph at the converted sizes (tiny sizes merge nodes)
    low, high = 0.25, 4.0  # a larger alpha is a smaller size and a lower cost
    for _ in range(40):
        mid = (low + high) / 2
        if cost(mid) > target:
            low = mid
        else:
            high = mid
    return cost(high)


def _call(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> None:
        with torch.no_grad():
            model(x)

    return call


def _channels_last(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_batch_norms(path: Path, tmp: Path) -> int:
    """BatchNormalization nodes left after ONNX Runtime's own graph optimisation of ``path``."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return sum(node.op_type == "BatchNormalization" for node in graph.node)


def _model_rows(name: str, tmp: Path, onnx_ok: bool) -> list[Row]:
    group = f"deploy {name}@{SIZE[0]} b{BATCH} {torch.get_num_threads()}T"
    torch.manual_seed(0)
    original = torchvision.models.get_model(name, weights=None).eval()
    original_gmacs = count_gmacs(original, SIZE).total
    x = torch.randn(BATCH, 3, *SIZE)
    eager: dict[str, Callable[[], object]] = {
        "original": _call(original, x),
        "original CL": _call(_channels_last(original), x.contiguous(memory_format=torch.channels_last)),
    }
    ort_fns: dict[str, Callable[[], object]] = {}
    gmacs: dict[str, float] = {}
    rows: list[Row] = []
    if onnx_ok:
        path = tmp / f"{name}.onnx"
        export_model(original, path, "onnx", input_size=SIZE, batch=BATCH, overwrite=True)
        session = _session(path)
        feed = {session.get_inputs()[0].name: x.numpy()}
        ort_fns["original"] = lambda session=session, feed=feed: session.run(None, feed)
        rows.append(Row(group, "ORT-optimised original: BatchNormalization left", _ort_batch_norms(path, tmp), "", "0"))
    for placement in PLACEMENTS:
        converted, _ = convert(original, SIZE, placement=placement)
        converted.eval()
        for level in LEVELS:
            key = f"{placement} {level}x"
            gmacs[key] = set_cost(converted, level, original_gmacs)
            eager[f"{key} plain"] = _call(freeze(converted, SIZE).eval(), x)
            eager[f"{key} fold"] = _call(freeze(converted, SIZE, fold_bn=True).eval(), x)
            eager[f"{key} deploy"] = _call(freeze(converted, SIZE, fold_bn=True, channels_last=True).eval(), x)
            if onnx_ok:
                path = tmp / f"{name}-{placement}-{level}.onnx"
                export_model(converted, path, "onnx", input_size=SIZE, batch=BATCH, overwrite=True)
                session = _session(path)
                feed = {session.get_inputs()[0].name: x.numpy()}
                ort_fns[key] = lambda session=session, feed=feed: session.run(None, feed)
    times = best_times(eager, repeats=REPEATS, warmup=1)
    ort_times = best_times(ort_fns, repeats=REPEATS, warmup=1) if ort_fns else {}
    rows.append(Row(group, "original eager latency", times["original"] * 1e3, "ms"))
    rows.append(Row(group, "original CL / original, eager", times["original CL"] / times["original"], "x"))
    if ort_times:
        rows.append(Row(group, "original ORT latency", ort_times["original"] * 1e3, "ms"))
    for key, ratio in gmacs.items():
        target = f"<= {GOAL * ratio:.2f}" if not key.endswith("1.0x") else ""

        def row(measure: str, value: float, goal: bool = False, key: str = key, target: str = target) -> Row:
            ok = value <= GOAL * gmacs[key] if goal and target else None
            return Row(group, f"{key}: {measure}", value, "x", target if goal else "", ok)

        rows.append(row("GMACs / original", ratio))
        rows.append(row("eager plain / original", times[f"{key} plain"] / times["original"]))
        rows.append(row("eager fold / original", times[f"{key} fold"] / times["original"]))
        rows.append(row("eager deploy / original", times[f"{key} deploy"] / times["original"], goal=True))
        rows.append(row("eager deploy / original CL", times[f"{key} deploy"] / times["original CL"]))
        if ort_times:
            rows.append(row("ORT / original ORT", ort_times[key] / ort_times["original"], goal=True))
    return rows


def run() -> list[Row]:
    threads = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("DYNOSWAP_BENCH_DEPLOY_THREADS", "1")))
    try:
        return _run()
    finally:
        torch.set_num_threads(threads)


def _run() -> list[Row]:
    try:
        import onnxruntime  # noqa: F401

        onnx_ok = True
    except ImportError:
        onnx_ok = False
    wanted = os.environ.get("DYNOSWAP_BENCH_DEPLOY_MODELS")
    models = tuple(wanted.split(",")) if wanted else MODELS
    rows = [] if onnx_ok else [Row("deploy", "onnxruntime not installed (pip install 'dynoswap[export]')", 0.0, "")]
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            rows += _model_rows(name, Path(tmp), onnx_ok)
    return rows
