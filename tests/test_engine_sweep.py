"""Model sweeps: every torchvision classifier, a timm sample, torchvision segmentation.

Run as a script to regenerate docs/compatibility.md:
``OMP_NUM_THREADS=1 .venv/bin/python tests/test_engine_sweep.py``.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from dynoswap.engine import ConversionError, convert
from dynoswap.layers import DynOPool2d

TV_CLASSIFIERS = sorted(torchvision.models.list_models(module=torchvision.models))
# Families that must convert (the paper's CNNs and their relatives).
CNN_PREFIXES = (
    "alexnet",
    "vgg",
    "resnet",
    "resnext",
    "wide_resnet",
    "densenet",
    "googlenet",
    "inception",
    "squeezenet",
    "shufflenet",
    "mobilenet",
    "mnasnet",
    "efficientnet",
    "regnet",
    "convnext",
)
# Fixed-size token grids: expected to be refused, with the node that pins the size.
NOT_CONVERTIBLE = {"vit_": "pos_embedding", "maxvit_": "combines"}
# Above this many parameters a model is only converted on the meta device (no forward): CPU budget.
GIANT_PARAMS = 150_000_000
TIMM_SAMPLE = [
    "resnet50d",
    "efficientnet_b0",
    "mobilenetv3_large_100",
    "regnetx_002",
    "convnext_atto",
    "densenet121",
    "inception_v3",
    "hrnet_w18_small",
    "ghostnet_100",
    "resnest14d",
    "dla34",
    "cspresnet50",
    "res2net50_26w_4s",
    "repvgg_a0",
    "rexnet_100",
    "legacy_xception",
    "nf_resnet26",
]
SEGMENTATION = ["fcn_resnet50", "deeplabv3_resnet50", "lraspp_mobilenet_v3_large"]
FAST = ["resnet18", "vgg11", "mobilenet_v2", "densenet121"]


def tv_kwargs(name: str) -> tuple[dict, int]:
    """Builder kwargs and a small input size for a torchvision classifier."""
    kwargs: dict = {"num_classes": 10}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(aux_logits=False, init_weights=False)
        return kwargs, 96 if name == "inception_v3" else 64
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


def check_converted(gm: nn.Module, size: int, output: Callable = lambda o: o) -> None:
    """Forward+backward, a finite non-zero gradient on every alpha, and a forward at moved alphas."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    gm.train()
    out = output(gm(x))
    (out.float() ** 2).mean().backward()
    owners = {n: m for n, m in gm.named_modules() if isinstance(m, DynOPool2d) and m.leader is m}
    assert owners
    for name, m in owners.items():
        grad = m.alpha.grad
        assert grad is not None and torch.isfinite(grad).all() and (grad != 0).any(), (name, grad)
    with torch.no_grad():
        for m in owners.values():
            m.alpha.uniform_(1.3, 4.0)
        gm.eval()
        moved = output(gm(x))
    assert moved.shape[0] == 2 and torch.isfinite(moved).all()


def run_torchvision(name: str) -> dict:
    """Convert one torchvision classifier; return its outcome (and check it when converted)."""
    kwargs, size = tv_kwargs(name)
    with torch.device("meta"):
        try:
            params = sum(p.numel() for p in torchvision.models.get_model(name, weights=None, **kwargs).parameters())
        except NotImplementedError:  # builders that compute with tensors (regnet): build uninitialised
            params = -1
    if params < 0:
        with no_init():
            params = sum(p.numel() for p in torchvision.models.get_model(name, weights=None, **kwargs).parameters())
    giant = params > GIANT_PARAMS
    if giant:
        with no_init():
            model = torchvision.models.get_model(name, weights=None, **kwargs)
        model = model.to("meta")
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return outcome(model, size, run=not giant)


def outcome(model: nn.Module, size: int, run: bool = True, output: Callable = lambda o: o, **options) -> dict:
    start = time.perf_counter()
    try:
        gm, report = convert(model, (size, size), **options)
    except ConversionError as err:
        return {"status": "not convertible", "reason": str(err), "seconds": time.perf_counter() - start}
    result = {
        "status": report.status,
        "dynopools": report.num_dynopools,
        "alphas": report.num_alphas,
        "resized": len(report.resized_to_partner),
        "checked": run,
        "reason": "",
    }
    if report.status == "converted" and run:
        check_converted(gm, size, output)
    result["seconds"] = time.perf_counter() - start
    return result


@pytest.mark.parametrize("name", FAST)
def test_fast_subset(name: str) -> None:
    result = run_torchvision(name)
    assert result["status"] == "converted" and result["checked"]


@pytest.mark.slow
@pytest.mark.parametrize("name", TV_CLASSIFIERS)
def test_torchvision_classifier(name: str) -> None:
    result = run_torchvision(name)
    expected = next((why for prefix, why in NOT_CONVERTIBLE.items() if name.startswith(prefix)), None)
    if name.startswith(CNN_PREFIXES):
        assert result["status"] == "converted", result
    elif expected is not None:
        assert result["status"] == "not convertible" and expected in result["reason"], result
    else:
        assert result["status"] in ("converted", "nothing to convert", "not convertible"), result


def build_timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_SAMPLE)
def test_timm_family(name: str) -> None:
    result = outcome(build_timm(name), 96)
    assert result["status"] == "converted", result


@pytest.mark.slow
def test_timm_hrnet_streams_tie_and_upsampling_follows_partner() -> None:
    gm, report = convert(build_timm("hrnet_w18_small"), (96, 96))
    # Stem (2 convs) + one alpha per lower-resolution stream.
    assert report.num_alphas == 5 and report.num_dynopools > report.num_alphas
    assert report.resized_to_partner and all(".fuse_layers." in n for n in report.resized_to_partner)
    assert not any(isinstance(m, nn.Upsample) for m in gm.modules())
    check_converted(gm, 96)


@pytest.mark.slow
@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_pre_placement_keeps_input_size(name: str) -> None:
    kwargs = {"weights_backbone": None, "num_classes": 3}
    if not name.startswith("lraspp"):
        kwargs["aux_loss"] = False
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    gm, report = convert(model, (64, 64), placement="pre")
    assert report.status == "converted"
    assert {r.rule for r in report.replacements} <= {"conv_pre", "pool"}
    check_converted(gm, 64, output=lambda o: o["out"])
    with torch.no_grad():
        assert gm(torch.randn(1, 3, 64, 64))["out"].shape == (1, 3, 64, 64)


# -- docs/compatibility.md --------------------------------------------------------------
def _row(library: str, name: str, result: dict) -> str:
    if result["status"] == "converted":
        detail = f"{result['dynopools']} DynOPool, {result['alphas']} alpha"
        if result["resized"]:
            detail += f", {result['resized']} upsampling resized to partner"
        if not result["checked"]:
            detail += " (converted on the meta device only: too large for the CPU test budget)"
    else:
        detail = result["reason"].replace("|", "\\|")
    return f"| {library} | `{name}` | {result['status']} | {detail} |"


def write_compatibility(path: Path) -> None:
    """Convert every model of the sweeps and write the outcome table."""
    rows = []
    for name in TV_CLASSIFIERS:
        rows.append(_row("torchvision", name, run_torchvision(name)))
        print(rows[-1], flush=True)
    for name in TIMM_SAMPLE:
        rows.append(_row("timm", name, outcome(build_timm(name), 96)))
        print(rows[-1], flush=True)
    for name in SEGMENTATION:
        kwargs = {
            "weights_backbone": None,
            "num_classes": 3,
            **({} if name.startswith("lraspp") else {"aux_loss": False}),
        }
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        result = outcome(model, 64, output=lambda o: o["out"], placement="pre")
        rows.append(_row("torchvision (segmentation, placement='pre')", name, result))
    head = path.read_text().split("<!-- table -->")[0] if path.exists() else "# Compatibility\n\n"
    body = "| library | model | outcome | details |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    path.write_text(head + "<!-- table -->\n\n" + body)


if __name__ == "__main__":
    torch.set_num_threads(1)
    write_compatibility(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/compatibility.md"))
