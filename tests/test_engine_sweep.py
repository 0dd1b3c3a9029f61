"""The broad sweep: every torchvision classifier and segmenter, one timm model per family.

Per model: convert at a small input; move every tie group to its own random scale in
[0.3, 0.8] (each axis on its own); forward + backward with a finite gradient on every alpha,
non-zero where the layer is above its 2-pixel minimum; ``gmacs_loss == count_gmacs`` to 1e-9;
``dynoswap.save`` -> ``dynoswap.load`` -> identical outputs. Or a refusal in a named category.
Every model must end as its entry in ``tests/data/sweep_expected.json`` says (:mod:`tests.sweep_table`):
a model that converts today fails the sweep if it regresses to a refusal or converts differently.
Which timm models: see :mod:`tests.sweep_models`.

Run the whole sweep and rewrite the pinned table and docs/compatibility.md from it:
``OMP_NUM_THREADS=1 python -m tests.test_engine_sweep [--resume]``; after a fix, run some models
again: ``... --rerun NAME [NAME ...]``; render the page from the table only: ``python -m tests.sweep_table``.
Review the diff of ``tests/data/sweep_expected.json`` before committing it: it is what the sweep checks.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import dynoswap
from dynoswap import convert, count_gmacs, gmacs_loss
from dynoswap.engine import ConversionError, TraceError
from dynoswap.layers import DynOPool2d
from dynoswap.models import ModelSource
from tests.sweep_models import (
    move_independently,
    owners,
    timm_families,
    torchvision_classifiers,
    torchvision_segmenters,
)
from tests.sweep_table import (
    SEGMENTATION,
    TORCHVISION,
    check_pinned,
    entry_of,
    load_table,
    planned,
    write_page,
    write_table,
)

# Above this many parameters a model is only converted on the meta device (no forward): CPU budget.
GIANT_PARAMS = 150_000_000
FAST = ["resnet18", "vgg11", "mobilenet_v2", "densenet121"]


def tv_kwargs(name: str) -> tuple[dict, int]:
    """Builder kwargs and a small input size for a torchvision classifier."""
    kwargs: dict = {"num_classes": 10}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(init_weights=False)  # the default init is slow (scipy); the aux heads stay
        return kwargs, 299 if name == "inception_v3" else 64
    if name.startswith("vit_"):
        size = 56 if name.endswith("_14") else 64  # a multiple of the patch size
        kwargs["image_size"] = size
        return kwargs, size
    if name.startswith("maxvit"):
        return kwargs, 224
    return kwargs, 64


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """Skip weight initialisation while building (giant models are only converted, never run)."""
    saved = {n: getattr(nn.init, n) for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")}
    for n in saved:
        setattr(nn.init, n, lambda t, *a, **k: t)
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def first_tensor(out: Any) -> torch.Tensor:
    """The main output: a tensor, a segmenter's ``out``, a namedtuple's first field."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"]
    return first_tensor(out[0])


def all_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of an output (auxiliary heads included), for a loss that reaches every alpha."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for v in values for t in all_tensors(v)]


def check_converted(gm: nn.Module, size: int, seed: int = 0) -> dict:
    """Moved scales, one training step, the loss against the count, a save/load round trip."""
    move_independently(gm, seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        # A zero-initialised classifier (timm's sequencer) sends no gradient anywhere at step 0; the first
        # optimiser step would give it weights, so give it random ones to see every alpha's gradient.
        for name, param in gm.named_parameters():
            if param.dim() > 1 and not name.endswith("alpha") and not param.any():
                param.normal_(0.0, 0.02)
    x = torch.randn(2, 3, size, size)
    gm.train()
    sum((t.float() ** 2).mean() for t in all_tensors(gm(x))).backward()
    at_minimum = 0
    for name, m in owners(gm).items():
        grad = m.alpha.grad
        assert grad is not None and torch.isfinite(grad).all(), (name, grad)
        sizes = [p.last_out_size for p in gm.modules() if isinstance(p, DynOPool2d) and p.leader is m]
        if all(s is not None and min(s) > 2 for s in sizes):
            assert (grad != 0).any(), (name, grad)
        else:
            at_minimum += 1
    loss, count = gmacs_loss(gm).item(), count_gmacs(gm, size).total
    assert math.isclose(loss, count, rel_tol=1e-9), (loss, count)
    with tempfile.TemporaryDirectory() as tmp:
        dynoswap.save(gm, Path(tmp) / "m")
        loaded = dynoswap.load(Path(tmp) / "m")
    gm.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(first_tensor(gm(x)), first_tensor(loaded(x))), "save -> load changed the outputs"
    return {"at_minimum": at_minimum, "gmacs": count}


def outcome(model: nn.Module, size: int, source: ModelSource, run: bool = True, **options: Any) -> dict:
    """Convert one model and check it; the outcome as a row of docs/compatibility.md."""
    start = time.perf_counter()
    try:
        gm, report = convert(model, (size, size), source=source, **options)
    except TraceError as err:
        return {"status": "refused", "category": "untraceable", "reason": str(err), "seconds": 0.0}
    except ConversionError as err:
        category = getattr(err, "category", "fails at the input size" if "check input_size" in str(err) else "other")
        return {"status": "refused", "category": category, "reason": str(err), "seconds": time.perf_counter() - start}
    result: dict = {
        "status": "converted" if report.replacements else "nothing to convert",
        "dynopools": report.num_dynopools,
        "alphas": report.num_alphas,
        "resized": len(report.resized_to_partner),
        "limits": len(report.limits),
        "checked": run and bool(report.replacements),
        "size": size,
        "reason": "",
    }
    if result["checked"]:
        result.update(check_converted(gm, size))
    result["seconds"] = time.perf_counter() - start
    return result


def _count_params(build: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):
        try:
            return sum(p.numel() for p in build().parameters())
        except NotImplementedError:  # builders that compute with tensors (regnet)
            pass
    with no_init():
        return sum(p.numel() for p in build().parameters())


def run_torchvision(name: str) -> dict:
    """Convert one torchvision classifier; return its outcome (and check it when converted)."""
    import torchvision

    kwargs, size = tv_kwargs(name)
    source = ModelSource("torchvision", name, kwargs)
    params = _count_params(lambda: torchvision.models.get_model(name, weights=None, **kwargs))
    if params > GIANT_PARAMS:
        with no_init():
            model = torchvision.models.get_model(name, weights=None, **kwargs).to("meta")
        return outcome(model, size, source, run=False)
    return outcome(torchvision.models.get_model(name, weights=None, **kwargs), size, source)


def run_segmenter(name: str) -> dict:
    import torchvision

    kwargs: dict = {"weights_backbone": None, "num_classes": 3}
    if not name.startswith("lraspp"):
        kwargs["aux_loss"] = False
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    return outcome(model, 64, ModelSource("torchvision", name, kwargs), placement="pre")


#: timm models swept at another input size than the rule in :func:`run_timm` gives, and why.
TIMM_SIZES = {
    # Its cfg marks a fixed input size (256), but its RoPE follows the map: it converts at any size. At 256
    # the check at moved scales (its 1/16 patch embedding at 0.3-0.8) attends over ~20k tokens: hours on CPU.
    "vit_tiny_patch16_dinov3_qkvb": 64,
}


def run_timm(name: str) -> dict:
    import timm

    kwargs = {"num_classes": 10}
    params = next((f["params"] for f in timm_families().values() if f["model"] == name), 0)
    if params > GIANT_PARAMS:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
        result = outcome(model, 64, ModelSource("timm", name, kwargs), run=False)
        size = patch_multiple(model, 64)
        if result.get("category") == "fails at the input size" and size != 64:  # a patch size that 64 is no multiple of
            result = outcome(model, size, ModelSource("timm", name, kwargs), run=False)
        return result
    cfg = timm.models.get_pretrained_cfg(name)
    size = 64
    if cfg is not None and getattr(cfg, "fixed_input_size", False):
        size = int(cfg.input_size[-1])
    size = TIMM_SIZES.get(name, size)
    model = timm.create_model(name, pretrained=False, **kwargs)
    result = outcome(model, size, ModelSource("timm", name, kwargs))
    if result.get("category") == "fails at the input size" and cfg is not None:
        size = int(cfg.input_size[-1])  # a model with a minimum input size: its own
        result = outcome(timm.create_model(name, pretrained=False, **kwargs), size, ModelSource("timm", name, kwargs))
    return result


def patch_multiple(model: nn.Module, size: int) -> int:
    """The largest multiple of every patch size the model's modules declare, at most ``size`` (at least one patch).

    A ViT's patch embedding asserts that its input is a multiple of its patch size (14 for DeepSeek's).
    """
    sides = set()
    for m in model.modules():
        patch = getattr(m, "patch_size", None)
        if isinstance(patch, int):
            sides.add(patch)
        elif isinstance(patch, (tuple, list)) and all(isinstance(p, int) for p in patch):
            sides.update(patch)
    step = math.lcm(*sides) if sides else 1
    return max(step, size // step * step)


#: Seconds one model may take in the page's sweep before it is recorded as a timeout.
MODEL_LIMIT_S = 120


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout(f"over {MODEL_LIMIT_S} s")


def safe(run: Callable[[str], dict], name: str, limit: int = 0) -> dict:
    """An outcome, or a crash with its first line (a timeout after ``limit`` seconds where set)."""
    if limit:
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(limit)
    try:
        return run(name)
    except _Timeout as err:
        return {"status": "timeout", "reason": f"no outcome within {limit} s ({err})"}
    except Exception as err:  # the sweep records crashes instead of stopping
        line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return {"status": "crash", "reason": f"{type(err).__name__}: {line}", "trace": traceback.format_exc()}
    finally:
        if limit:
            signal.alarm(0)


@pytest.mark.parametrize("name", FAST)
def test_fast_subset(name: str) -> None:
    result = run_torchvision(name)
    assert result["status"] == "converted" and result["checked"], result
    check_pinned(TORCHVISION, name, result)


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_classifiers())
def test_torchvision_classifier(name: str) -> None:
    check_pinned(TORCHVISION, name, safe(run_torchvision, name))


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_segmenters())
def test_torchvision_segmenter(name: str) -> None:
    check_pinned(SEGMENTATION, name, safe(run_segmenter, name))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(f for f, v in timm_families().items() if v["conv2d_or_pool2d"]))
def test_timm_family(family: str) -> None:
    name = timm_families()[family]["model"]
    check_pinned(f"timm ({family})", name, safe(run_timm, name))


@pytest.mark.slow
def test_timm_hrnet_streams_tie_and_upsampling_follows_partner() -> None:
    import timm

    gm, report = convert(timm.create_model("hrnet_w18_small", num_classes=10), (96, 96))
    # Stem (2 convs) + one alpha per lower-resolution stream.
    assert report.num_alphas == 5 and report.num_dynopools > report.num_alphas
    assert report.resized_to_partner and all(".fuse_layers." in n for n in report.resized_to_partner)
    assert not any(isinstance(m, nn.Upsample) for m in gm.modules())
    move_independently(gm, 0)
    assert math.isclose(gmacs_loss(gm).item(), count_gmacs(gm, 96).total, rel_tol=1e-9)


@pytest.mark.slow
def test_hrnet_w48_features_at_paper_size_loss_equals_count() -> None:
    """Table 4's setting: timm hrnet_w48 features at 480x480, placement="pre", random scales."""
    import timm

    model = timm.create_model("hrnet_w48", features_only=True, pretrained=False)
    gm, _ = convert(model, (480, 480), placement="pre")
    for seed in range(2):
        move_independently(gm, seed, 0.5, 1.0)
        assert math.isclose(gmacs_loss(gm).item(), count_gmacs(gm, 480).total, rel_tol=1e-9)
        assert math.isclose(gmacs_loss(gm, (320, 400)).item(), count_gmacs(gm, (320, 400)).total, rel_tol=1e-9)


# -- the pinned table and docs/compatibility.md ---------------------------------------------
def runner_of(library: str) -> Callable[[str], dict]:
    """The sweep function of a library label."""
    if library == SEGMENTATION:
        return run_segmenter
    return run_torchvision if library == TORCHVISION else run_timm


def write_sweep(resume: bool = False) -> None:
    """Run the whole sweep; rewrite the pinned table and the page after each model (``resume``: keep entries)."""
    torch.set_num_threads(1)
    plan = planned()
    old = load_table() if resume else {"seconds": 0.0, "models": []}
    done = {(e["library"], e["model"]): e for e in old["models"] if e["status"] != "crash"}
    table = {"seconds": float(old["seconds"]), "planned": len(plan), "rerun": [], "models": []}
    start = time.perf_counter() - table["seconds"]
    for library, name in plan:
        if (library, name) in done:
            table["models"].append(done[library, name])
            continue
        result = safe(runner_of(library), name, MODEL_LIMIT_S)
        table["models"].append(entry_of(library, name, result))
        print(library, name, result["status"], f"({result.get('seconds', 0):.1f} s)", flush=True)
        table["seconds"] = time.perf_counter() - start
        later = [done[k] for k in plan[len(table["models"]) :] if k in done]  # resumed entries not reached yet
        write_table({**table, "models": table["models"] + later})
        write_page()


def rerun(names: list[str]) -> None:
    """Run some models again and replace their entries (after a fix), keeping the rest of the table."""
    torch.set_num_threads(1)
    table = load_table()
    for i, entry in enumerate(table["models"]):
        if entry["model"] in names:
            table["models"][i] = entry_of(
                entry["library"], entry["model"], safe(runner_of(entry["library"]), entry["model"])
            )
            print(table["models"][i], flush=True)
    table["rerun"] = sorted(set(table.get("rerun", [])) | set(names))
    write_table(table)
    write_page(table)


if __name__ == "__main__":
    if "--rerun" in sys.argv:
        rerun(sys.argv[sys.argv.index("--rerun") + 1 :])
    else:
        write_sweep("--resume" in sys.argv)
