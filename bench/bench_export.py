"""Deployment speed: frozen vs original and vs unfrozen (CPU), ONNX Runtime vs eager, compiled training.

ResNet-18 converted at 224x224 with its initial scales, so the frozen model has the
original's stage sizes: the ratio to the original is the price of the conversion itself
(``conv_post`` runs each strided conv at stride 1 before its DynOPool). Trained scales
change the sizes and hence the cost; the GMACs row says what the sizes imply.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

from bench.common import Row, median_times
from dynoswap import convert, count_gmacs
from dynoswap.export import export_model, freeze
from dynoswap.layers import DynOPool2d

SIZE = (224, 224)
BATCHES = (1, 32)
GROUP = "export resnet18@224"


def _no_grad(model: torch.nn.Module, x: torch.Tensor):
    def call() -> None:
        with torch.no_grad():
            model(x)

    return call


def _latency_rows(original, unfrozen, frozen) -> list[Row]:
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, 3, *SIZE)
        repeats = 7 if batch == 1 else 3
        times = median_times(
            {
                "original": _no_grad(original, x),
                "unfrozen": _no_grad(unfrozen, x),
                "frozen": _no_grad(frozen, x),
            },
            repeats=repeats,
            warmup=1,
        )
        rows += [
            Row(GROUP, f"frozen eval latency, batch {batch}", times["frozen"] * 1e3, "ms"),
            Row(GROUP, f"original eval latency, batch {batch}", times["original"] * 1e3, "ms"),
            Row(GROUP, f"frozen / original, batch {batch}", times["frozen"] / times["original"], "x"),
            Row(GROUP, f"frozen / unfrozen eval, batch {batch}", times["frozen"] / times["unfrozen"], "x", "<= 1"),
        ]
    return rows


def _onnx_rows(unfrozen) -> list[Row]:
    try:
        import onnxruntime as ort
    except ImportError:
        return [Row(GROUP, "onnxruntime not installed (pip install 'dynoswap[export]')", 0.0, "")]
    frozen = freeze(unfrozen, SIZE).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet18.onnx"
        result = export_model(unfrozen, path, "onnx", input_size=SIZE, dynamic_batch=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        rows = [Row(GROUP, "ONNX file vs eager, max abs diff", result.max_abs_diff, "", "<= 1e-4")]
        for batch in BATCHES:
            x = torch.randn(batch, 3, *SIZE)
            feed = {session.get_inputs()[0].name: x.numpy()}
            times = median_times(
                {"ort": lambda feed=feed: session.run(None, feed), "eager": _no_grad(frozen, x)},
                repeats=7 if batch == 1 else 3,
                warmup=1,
            )
            rows.append(Row(GROUP, f"ONNX Runtime latency, batch {batch}", times["ort"] * 1e3, "ms"))
            rows.append(Row(GROUP, f"ONNX Runtime / eager frozen, batch {batch}", times["ort"] / times["eager"], "x"))
    return rows


def _compile_rows(backend_name: str) -> list[Row]:
    """A training step of converted ResNet-18 (64x64, batch 8) with every tie group moving each step.

    ``capture_scalar_outputs`` keeps the DynOPool cell counts symbolic, so the forward is one graph.
    With ``inductor`` on CPU (torch 2.14) the convolution-backward lowering specializes spatial
    sizes, so each new size still recompiles there: set ``DYNOSWAP_BENCH_INDUCTOR=1`` to measure it.
    """
    import torch._dynamo

    group = f"compile resnet18@64 train ({backend_name})"
    steps, warm = 8, 3
    results: dict[str, tuple[float, float, int]] = {}
    for mode in ("eager", "compiled"):
        torch.manual_seed(0)
        gm, _ = convert(torchvision.models.resnet18(num_classes=10), (64, 64))
        leaders = [m for m in gm.modules() if isinstance(m, DynOPool2d) and m.leader is m]
        opt = torch.optim.SGD(gm.parameters(), lr=0.01)
        compiles: list[int] = []

        def backend(graph, example_inputs, compiles=compiles):
            compiles.append(1)
            return torch._dynamo.lookup_backend(backend_name)(graph, example_inputs)

        torch._dynamo.reset()
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            net = torch.compile(gm, backend=backend) if mode == "compiled" else gm
            x, y = torch.randn(8, 3, 64, 64), torch.randint(0, 10, (8,))
            gen = torch.Generator().manual_seed(0)
            times = []
            for _ in range(steps):
                for layer in leaders:
                    layer.set_scale((0.35 + 0.4 * torch.rand(2, generator=gen)).tolist())
                start = time.perf_counter()
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
                times.append(time.perf_counter() - start)
        results[mode] = (times[0], statistics.median(times[warm:]), len(compiles))
    eager, compiled = results["eager"], results["compiled"]
    return [
        Row(group, "eager step (median after warm-up)", eager[1], "s"),
        Row(group, "compiled step, first (compiles)", compiled[0], "s"),
        Row(group, "compiled step (median after warm-up)", compiled[1], "s"),
        Row(group, "compiled / eager step after warm-up", compiled[1] / eager[1], "x"),
        Row(group, f"graphs compiled over {steps} steps, sizes moving", compiled[2], "", "1", compiled[2] == 1),
    ]


def run() -> list[Row]:
    torch.manual_seed(0)
    original = torchvision.models.resnet18(num_classes=10).eval()
    unfrozen, _ = convert(original, SIZE)
    unfrozen.eval()
    frozen = freeze(unfrozen, SIZE).eval()
    gmacs = count_gmacs(frozen, SIZE).total / count_gmacs(original, SIZE).total
    rows = [Row(GROUP, "GMACs frozen / original (same stage sizes)", gmacs, "x")]
    rows += _latency_rows(original, unfrozen, frozen)
    rows += _onnx_rows(unfrozen)
    rows += _compile_rows("aot_eager")
    if os.environ.get("DYNOSWAP_BENCH_INDUCTOR"):
        rows += _compile_rows("inductor")
    return rows
