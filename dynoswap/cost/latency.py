"""Latency tables: measured per-layer latency as a function of size, and a differentiable latency cost.

:func:`profile` times each MAC-bearing layer of a converted model in the form it takes after
deployment (:func:`dynoswap.export.freeze` with batch norm folded: a folded norm costs
nothing, a DynOPoolNd is its frozen resample) at a few input sizes around the current ones,
on one backend (:data:`BACKENDS`: CPU eager, ONNX Runtime, CUDA eager). Each layer gets a
piecewise-linear curve of latency (ms) against the pixel count of its node in the
resolution graph (:mod:`dynoswap.cost.resolution`). What the layers do not see (activations,
additions, the classifier, framework overhead) is calibrated on the whole frozen model at a
few random size settings: ``total = scale * sum(layers) + offset_ms`` (:func:`profile` keeps
the median ratio as the scale, offset 0). The table is a small
JSON file (:meth:`LatencyTable.save` / :meth:`LatencyTable.load`).

:func:`latency_cost` evaluates a table on a model through the same straight-through sizes as
:func:`dynoswap.gmacs_loss` (:meth:`ResolutionGraph.evaluate`): its value is the table's
prediction at the real integer sizes, its gradient reaches every alpha through the slope of
each curve. It has gmacs_loss's shape, so ``fit(cost_fn=lambda m: latency_cost(m, table))``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LatencyTableError
from ..layers import DynOPoolNd, cells
from .reference import unwrap
from .resolution import ResolutionGraph, resolution_graph

TABLE_KEY = "dynoswap_latency_table"
TABLE_VERSION = 1
OUTPUT_KIND = "latency table"
#: Input-size factors each layer is timed at (relative to its input at the current sizes).
FACTORS = (0.35, 0.5, 0.7, 0.85, 1.0, 1.25, 1.6)
#: Range of the random size multipliers of the calibration and validation settings (see :func:`random_settings`).
SETTING_RANGE = (0.55, 1.3)

Op = Callable[[torch.Tensor], Any]


# -- the table --------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerLatency:
    """One layer's measured latency curve: milliseconds at ascending pixel counts of its node.

    Between knots the curve is linear; beyond the ends it continues the end segments
    (never below 0). One knot is a constant.
    """

    name: str
    pixels: tuple[float, ...]
    ms: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.pixels or len(self.pixels) != len(self.ms):
            raise LatencyTableError(f"latency curve of {self.name!r} needs as many pixel counts as times (>= 1)")
        if any(b <= a for a, b in zip(self.pixels, self.pixels[1:], strict=False)):
            raise LatencyTableError(f"latency curve of {self.name!r}: pixel counts must increase, got {self.pixels}")
        if not all(math.isfinite(v) and v >= 0 for v in self.pixels + self.ms):
            raise LatencyTableError(f"latency curve of {self.name!r}: values must be finite and >= 0")

    def _segment(self, pixels: float) -> int:
        """Index ``i`` of the segment (knots ``i - 1``, ``i``) that covers ``pixels``."""
        i = 1
        while i < len(self.pixels) - 1 and pixels > self.pixels[i]:
            i += 1
        return i

    def predict(self, pixels: float) -> float:
        """Latency (ms) at ``pixels`` output pixels of the layer's node."""
        if len(self.pixels) == 1:
            return self.ms[0]
        i = self._segment(pixels)
        slope = (self.ms[i] - self.ms[i - 1]) / (self.pixels[i] - self.pixels[i - 1])
        return max(self.ms[i - 1] + slope * (pixels - self.pixels[i - 1]), 0.0)

    def predict_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """:meth:`predict` of a scalar tensor, differentiable: the gradient is the segment's slope."""
        if len(self.pixels) == 1:
            return pixels * 0 + self.ms[0]
        i = self._segment(float(pixels.detach()))
        slope = (self.ms[i] - self.ms[i - 1]) / (self.pixels[i] - self.pixels[i - 1])
        return torch.clamp_min(self.ms[i - 1] + slope * (pixels - self.pixels[i - 1]), 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return {"name": self.name, "pixels": list(self.pixels), "ms": list(self.ms)}


@dataclass(frozen=True)
class LatencyTable:
    """Per-layer latency curves of one model on one backend, and the whole-model calibration.

    Attributes:
        model: What was profiled (the model name or the class name).
        backend: Key of :data:`BACKENDS` the times were taken with.
        device: The machine in words (processor, threads or GPU name).
        input_size: Input (H, W) of the profile.
        batch: Batch size of every timing.
        layers: Curves by layer name (the names of the resolution graph's layers).
        scale: Whole-model calibration: ``total = scale * sum(layers) + offset_ms``.
        offset_ms: See ``scale``.
        validation: Predicted vs measured on held-out size settings (``settings``,
            ``median_abs_error``, ``max_abs_error``, each error relative), or None.
    """

    model: str
    backend: str
    device: str
    input_size: tuple[int, int]
    batch: int
    layers: Mapping[str, LayerLatency]
    scale: float = 1.0
    offset_ms: float = 0.0
    validation: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (what :meth:`save` writes)."""
        return {
            TABLE_KEY: TABLE_VERSION,
            "model": self.model,
            "backend": self.backend,
            "device": self.device,
            "input_size": list(self.input_size),
            "batch": self.batch,
            "scale": self.scale,
            "offset_ms": self.offset_ms,
            "validation": dict(self.validation) if self.validation is not None else None,
            "layers": [layer.to_dict() for layer in self.layers.values()],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "latency table") -> LatencyTable:
        """Read and validate a table (the inverse of :meth:`to_dict`).

        Raises:
            LatencyTableError: not a latency table, another version, or a malformed field.
        """
        if not isinstance(data, Mapping) or TABLE_KEY not in data:
            raise LatencyTableError(f"{source} is not a dynoswap latency table (write one with `dynoswap profile`)")
        if data[TABLE_KEY] != TABLE_VERSION:
            raise LatencyTableError(f"{source}: latency table version {data[TABLE_KEY]!r} is not {TABLE_VERSION}")
        try:
            layers = [
                LayerLatency(str(d["name"]), tuple(float(v) for v in d["pixels"]), tuple(float(v) for v in d["ms"]))
                for d in data["layers"]
            ]
            h, w = (int(v) for v in data["input_size"])
            table = cls(
                model=str(data["model"]),
                backend=str(data["backend"]),
                device=str(data["device"]),
                input_size=(h, w),
                batch=int(data["batch"]),
                layers={layer.name: layer for layer in layers},
                scale=float(data["scale"]),
                offset_ms=float(data["offset_ms"]),
                validation={str(k): float(v) for k, v in data["validation"].items()} if data["validation"] else None,
            )
        except LatencyTableError as exc:
            raise LatencyTableError(f"{source}: {exc}") from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise LatencyTableError(f"{source} is malformed ({type(exc).__name__}: {exc})") from exc
        if not (math.isfinite(table.scale) and table.scale > 0 and math.isfinite(table.offset_ms)):
            raise LatencyTableError(f"{source}: scale must be finite and > 0 and offset_ms finite")
        return table

    def save(self, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
        """Write the table as JSON, crash-safely; an existing table is replaced only with ``overwrite``."""
        from ..io.output import replace_output

        with replace_output(path, OUTPUT_KIND, force=overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Read a table written by :meth:`save`.

        Raises:
            LatencyTableError: the file is missing, not JSON or not a valid table.
        """
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise LatencyTableError(f"cannot read latency table {path}: {exc.strerror or exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LatencyTableError(f"latency table {path} is not JSON ({exc.msg}, line {exc.lineno})") from exc
        return cls.from_dict(data, source=f"latency table {path}")


def _is_table(path: Path) -> bool:
    try:
        return path.is_file() and TABLE_KEY in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _register_kind() -> None:
    from ..io.output import register_output_kind

    register_output_kind(OUTPUT_KIND, _is_table)


_register_kind()


# -- the cost ------------------------------------------------------------------------------
def _graph_and_size(model: nn.Module, input_size: int | Sequence[int] | None) -> tuple[ResolutionGraph, Any]:
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    return resolution_graph(model, size), size


def _check_names(graph: ResolutionGraph, table: LatencyTable) -> None:
    known = {layer.name for layer in graph.layers}
    foreign = [name for name in table.layers if name not in known]
    if foreign:
        raise LatencyTableError(
            f"the latency table of {table.model!r} names layers this model does not have ({', '.join(foreign[:3])}"
            f"{', ...' if len(foreign) > 3 else ''}): profile this model with `dynoswap profile`"
        )


def latency_cost(model: nn.Module, table: LatencyTable, input_size: int | Sequence[int] | None = None) -> torch.Tensor:
    """Return the table's predicted latency (ms) of ``model`` at its alphas, differentiable w.r.t. every alpha.

    Sizes come from :meth:`ResolutionGraph.evaluate` (straight-through, as in
    :func:`dynoswap.gmacs_loss`): the value is the prediction at the integer sizes the model
    really runs at, and each layer sends ``slope * d(h w)`` to every upstream alpha.

    Args:
        model: A converted model (the one profiled, or one of the same conversion).
        table: Its latency table.
        input_size: (H, W); default: the converted model's input size.

    Returns:
        A float64 scalar in milliseconds (the table's batch size).

    Raises:
        LatencyTableError: the table names layers the model does not have.
    """
    graph, size = _graph_and_size(model, input_size)
    _check_names(graph, table)
    sizes = graph.evaluate(size)
    total = torch.zeros((), dtype=torch.float64, device=graph.device())
    for layer in graph.layers:
        curve = table.layers.get(layer.name)
        if curve is not None:
            total = total + curve.predict_tensor(sizes[layer.node][0] * sizes[layer.node][1])
    return total * table.scale + table.offset_ms


def predict_latency(model: nn.Module, table: LatencyTable, input_size: int | Sequence[int] | None = None) -> float:
    """Return the table's predicted latency (ms) at the model's integer sizes, in plain Python (no autograd)."""
    graph, size = _graph_and_size(model, input_size)
    _check_names(graph, table)
    sizes = graph.int_sizes(size)
    raw = sum(
        table.layers[layer.name].predict(sizes[layer.node][0] * sizes[layer.node][1])
        for layer in graph.layers
        if layer.name in table.layers
    )
    return raw * table.scale + table.offset_ms


# -- backends -----------------------------------------------------------------------------
def _best_ms(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Fastest of ``repeats`` timed calls (ms): on a shared machine, preemption only ever adds time."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        samples.append(time.perf_counter() - start)
    return min(samples) * 1e3


class _Wrap(nn.Module):
    """An op (a module or a function of one tensor) as a module, for export."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.inner = op if isinstance(op, nn.Module) else None
        self.op = op

    def forward(self, x: torch.Tensor) -> Any:
        return self.op(x)


@dataclass(frozen=True)
class Backend:
    """Where latency is measured.

    Attributes:
        name: Key in :data:`BACKENDS` and the ``--backend`` value.
        missing: Returns why the backend cannot run here, or None.
        time_op: ``(op, x, repeats) -> best ms`` of ``op(x)`` on this backend.
        describe: The machine in words.
        channels_last: Whether models are frozen in channels_last for this backend.
    """

    name: str
    missing: Callable[[], str | None]
    time_op: Callable[[Op, torch.Tensor, int], float]
    describe: Callable[[], str]
    channels_last: bool = False


def _cpu_name() -> str:
    import platform

    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _time_eager(op: Op, x: torch.Tensor, repeats: int) -> float:
    if x.dim() == 4:  # channels_last, as the deployed model runs (bench deploy measures why)
        x = x.contiguous(memory_format=torch.channels_last)
        if isinstance(op, nn.Module):
            op.to(memory_format=torch.channels_last)
    with torch.no_grad():
        return _best_ms(lambda: op(x), repeats)


def _cuda_missing() -> str | None:
    return None if torch.cuda.is_available() else "CUDA is not available on this machine"


def _time_cuda(op: Op, x: torch.Tensor, repeats: int) -> float:
    module = _Wrap(op).to("cuda")
    x = x.to("cuda")
    with torch.no_grad():
        return _best_ms(lambda: module(x), repeats, sync=torch.cuda.synchronize)


def _ort_missing() -> str | None:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'dynoswap[export]')"
    return None


def _time_ort(op: Op, x: torch.Tensor, repeats: int) -> float:
    import onnxruntime as ort

    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # The TorchScript exporter: a layer exports in a fraction of a second (the dynamo one takes seconds).
        torch.onnx.export(_Wrap(op).eval(), (x,), buffer, dynamo=False, opset_version=18)  # type: ignore[arg-type]
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return _best_ms(lambda: session.run(None, feed), repeats)


def _gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"


#: Backends by name; add one with ``BACKENDS[name] = Backend(...)``.
BACKENDS: dict[str, Backend] = {
    "eager": Backend("eager", lambda: None, _time_eager, _cpu_name, channels_last=True),
    "onnxruntime": Backend("onnxruntime", _ort_missing, _time_ort, _cpu_name),
    "cuda": Backend("cuda", _cuda_missing, _time_cuda, _gpu_name),
}


def lookup_backend(name: str) -> Backend:
    """Return the backend called ``name``, checked to run here.

    Raises:
        LatencyTableError: an unknown backend, or one that cannot run on this machine.
    """
    backend = BACKENDS.get(name)
    if backend is None:
        raise LatencyTableError(f"unknown latency backend {name!r}; choose one of {', '.join(BACKENDS)}")
    reason = backend.missing()
    if reason is not None:
        raise LatencyTableError(f"backend {name!r} cannot run here: {reason}")
    return backend


# -- profiling -----------------------------------------------------------------------------
@dataclass
class _Site:
    """A profiled layer: the op it runs when deployed, its input at the current sizes, its node's pixels."""

    name: str
    op: Op
    x: torch.Tensor
    out_pixels: int
    node_pixels: int
    resize: Callable[[torch.Tensor], Op] | None = None  #: a DynOPool: its frozen op at another input


def _pool_op(layer: DynOPoolNd) -> Callable[[torch.Tensor], Op]:
    from ..export.freeze import _PRECISIONS, resize_pool

    a_h, a_w = layer.alpha.detach().double().tolist()
    dtype = _PRECISIONS["float64" if layer.alpha.dtype == torch.float64 else "float32"]

    def make(x: torch.Tensor) -> Op:
        out = (cells(x.shape[-2], a_h, dtype), cells(x.shape[-1], a_w, dtype))
        return lambda t: resize_pool(t, out, layer.aggregate)

    return make


def _sites(model: nn.Module, graph: ResolutionGraph, size: tuple[int, int], batch: int) -> list[_Site]:
    """List the layers to time, with their inputs at ``size`` (one eval forward records them)."""
    from ..export.freeze import example_input, freeze

    deployed = dict(freeze(model, fold_bn=True).named_modules())
    modules = dict(model.named_modules())
    node_sizes = graph.int_sizes(size)
    wanted = {layer.name: layer.node for layer in graph.layers}
    seen: dict[str, tuple[torch.Tensor, int]] = {}

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any, name: str) -> None:
        if name not in seen and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            pixels = out.shape[-2] * out.shape[-1] if out.dim() == 4 else 1
            seen[name] = (args[0].detach().clone(), pixels)

    handles = [
        modules[name].register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
        for name in wanted
        if name in modules
    ]
    try:
        with torch.no_grad():
            model.eval()(example_input(model, size, batch, seed=0))
    finally:
        for handle in handles:
            handle.remove()
    sites = []
    for name, node in wanted.items():
        if name not in seen:
            continue
        x, out_pixels = seen[name]
        h, w = node_sizes[node]
        module = modules[name]
        if isinstance(module, DynOPoolNd):
            make = _pool_op(module)
            sites.append(_Site(name, make(x), x, out_pixels, h * w, resize=make))
        elif name in deployed:  # folded batch norms are gone: they cost nothing deployed
            sites.append(_Site(name, deployed[name], x, out_pixels, h * w))
    return sites


def _scaled_input(x: torch.Tensor, factor: float) -> torch.Tensor:
    if x.dim() != 4:
        return x
    h, w = (max(1, round(v * factor)) for v in x.shape[-2:])
    return torch.randn(x.shape[0], x.shape[1], h, w, dtype=x.dtype, generator=torch.Generator().manual_seed(0))


def _curve(site: _Site, backend: Backend, repeats: int, factors: Sequence[float]) -> LayerLatency:
    points: dict[float, list[float]] = {}
    for factor in factors if site.x.dim() == 4 else (1.0,):
        x = _scaled_input(site.x, factor)
        op = site.resize(x) if site.resize is not None else site.op
        with torch.no_grad():
            out = op(x)
        out_pixels = out.shape[-2] * out.shape[-1] if out.dim() == 4 else 1
        pixels = float(site.node_pixels * out_pixels / max(site.out_pixels, 1))
        points.setdefault(pixels, []).append(backend.time_op(op, x, repeats))
    knots = sorted(points)
    ms = [statistics.median(points[p]) for p in knots]
    for i in range(1, len(ms)):  # more pixels never cost less: timing noise flattened
        ms[i] = max(ms[i], ms[i - 1])
    return LayerLatency(site.name, tuple(knots), tuple(ms))


@contextlib.contextmanager
def _alphas_kept(model: nn.Module, graph: ResolutionGraph) -> Iterator[list[DynOPoolNd]]:
    """Tie group leaders in execution order; their alphas are restored on exit."""
    pools = [model.get_submodule(name) for name in graph.dynopools]
    pools += [m for m in model.modules() if isinstance(m, DynOPoolNd)]
    leaders = list({id(m.leader): m.leader for m in pools if isinstance(m, DynOPoolNd)}.values())
    saved = [m.alpha.detach().clone() for m in leaders]
    try:
        yield leaders
    finally:
        with torch.no_grad():
            for layer, alpha in zip(leaders, saved, strict=True):
                layer.alpha.copy_(alpha)


def random_settings(count: int, groups: int, seed: int) -> list[list[float]]:
    """``count`` random settings: one alpha factor per tie group (groups in execution order).

    Sizes compound along a chain of DynOPools, so each setting draws the size multiplier
    ``s_k`` *after* group ``k`` log-uniform in :data:`SETTING_RANGE` and gives the group the
    alpha factor ``s_{k-1} / s_k``: every stage of a chain lands within the range.
    """
    rng = random.Random(seed)
    low, high = (math.log(v) for v in SETTING_RANGE)
    settings = []
    for _ in range(count):
        sizes = [1.0] + [math.exp(rng.uniform(low, high)) for _ in range(groups)]
        settings.append([sizes[k] / sizes[k + 1] for k in range(groups)])
    return settings


def measure_model(model: nn.Module, backend: Backend, size: tuple[int, int], batch: int, repeats: int) -> float:
    """Best-of-``repeats`` latency (ms) of ``model`` frozen for deployment at its current alphas, on ``backend``."""
    from ..export.freeze import example_input, freeze

    frozen = freeze(model, size, fold_bn=True, channels_last=backend.channels_last).eval()
    return backend.time_op(frozen, example_input(frozen, size, batch, seed=0), repeats)


@dataclass
class SettingResult:
    """One size setting: its alpha factors, predicted and measured latency (ms)."""

    factors: list[float]
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """Relative error of the prediction."""
        return abs(self.predicted - self.measured) / self.measured


@dataclass
class ProfileResult:
    """What :func:`profile` produced: the table and the held-out settings it was checked on."""

    table: LatencyTable
    validation: list[SettingResult] = field(default_factory=list)


def _at_settings(
    model: nn.Module,
    leaders: list[DynOPoolNd],
    base: list[torch.Tensor],
    settings: list[list[float]],
    measure: Callable[[], float],
    predict: Callable[[], float],
) -> list[SettingResult]:
    results = []
    for factors in settings:
        with torch.no_grad():
            for layer, alpha, factor in zip(leaders, base, factors, strict=True):
                layer.alpha.copy_(alpha * factor)
        results.append(SettingResult(factors, predict(), measure()))
    return results


def profile(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    backend: str = "eager",
    batch: int = 1,
    repeats: int = 5,
    calibrate: int = 8,
    validate: int = 20,
    factors: Sequence[float] = FACTORS,
    seed: int = 0,
    name: str | None = None,
) -> ProfileResult:
    """Measure a latency table of a converted model on one backend.

    Each MAC-bearing layer is timed alone, in its deployed form, at inputs scaled by ``factors``;
    the whole frozen model is timed at ``calibrate`` random size settings (every tie group's alpha
    times its own random factor) to fit the calibration, and at ``validate`` other settings to
    measure the prediction error. The model's alphas are restored afterwards.

    Args:
        model: A converted model (a GraphModule with DynOPoolNd layers).
        input_size: (H, W); default: the converted model's input size.
        backend: Key of :data:`BACKENDS`.
        batch: Batch size of every timing.
        repeats: Timed calls per measurement (the fastest is kept: noise only adds time).
        calibrate: Whole-model settings for the calibration (0: scale 1, offset 0).
        validate: Held-out settings for the reported error (0: none).
        factors: Input-size factors of the per-layer sweep.
        seed: Seed of the random settings.
        name: The model's name in the table; default: its class name.

    Raises:
        LatencyTableError: the backend cannot run here.
    """
    chosen = lookup_backend(backend)
    model = unwrap(model)
    graph, size = _graph_and_size(model, input_size)
    size = graph.input_size if size is None else tuple(int(v) for v in size)
    if len(size) != 2:
        raise LatencyTableError(f"latency tables are measured for 2-D models; this one's input size is {size}")
    size = (size[0], size[1])
    was_training = model.training
    model.eval()
    try:
        with _alphas_kept(model, graph) as leaders:
            layers = {s.name: _curve(s, chosen, repeats, factors) for s in _sites(model, graph, size, batch)}
            draft = LatencyTable(name or type(model).__name__, chosen.name, chosen.describe(), size, batch, layers)
            base = [m.alpha.detach().clone() for m in leaders]
            settings = random_settings(calibrate + validate, len(leaders), seed)

            def measure() -> float:
                return measure_model(model, chosen, size, batch, repeats)

            def raw() -> float:
                return predict_latency(model, draft, size)

            # Calibration settings spread over the run: a change of load on a shared machine then hits
            # the calibration and the held-out settings alike.
            measured = _at_settings(model, leaders, base, settings, measure, raw)
            total = len(settings)
            picked = {round(i * total / calibrate) for i in range(calibrate)} if calibrate else set()
            scale, offset = _calibration([measured[i] for i in sorted(picked)])
            table = LatencyTable(draft.model, draft.backend, draft.device, size, batch, layers, scale, offset)
            held_out = [
                SettingResult(r.factors, r.predicted * scale + offset, r.measured)
                for i, r in enumerate(measured)
                if i not in picked
            ]
    finally:
        model.train(was_training)
    if held_out:
        errors = [r.error for r in held_out]
        summary = {"settings": float(len(held_out)), "median_abs_error": statistics.median(errors)}
        summary["max_abs_error"] = max(errors)
        table = LatencyTable(table.model, table.backend, table.device, size, batch, layers, scale, offset, summary)
    return ProfileResult(table, held_out)


def _calibration(results: list[SettingResult]) -> tuple[float, float]:
    """``measured = scale * predicted``, scale the median ratio (robust to a preempted timing); no offset.

    What the layers leave out (activations, additions) grows with the same feature maps, so it
    scales with them; a free intercept fitted on a few noisy settings extrapolates badly.
    """
    ratios = [r.measured / r.predicted for r in results if r.predicted > 0]
    return (statistics.median(ratios), 0.0) if ratios else (1.0, 0.0)
