"""The zoo's 1-D and video models: m5, resnet1d, video-tiny (shapes, lengths, tracing, arguments)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dynoswap import zoo
from dynoswap.cli.common import exit_code_of
from dynoswap.engine.trace import trace
from dynoswap.errors import ModelError
from dynoswap.models import resolve_source
from dynoswap.sources import build_model
from dynoswap.zoo.audio import M5, ResNet1d
from dynoswap.zoo.video import VideoTiny


def _lengths(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Spatial/temporal sizes after every resizing layer, in order."""
    sizes: list[tuple[int, ...]] = []
    kinds = (nn.MaxPool1d, nn.MaxPool3d, nn.Conv1d, nn.Conv3d)
    hooks = [
        m.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:])))
        for m in model.modules()
        if isinstance(m, kinds) and (getattr(m, "stride", 1) not in (1, (1,), (1, 1, 1)) or isinstance(m, kinds[:2]))
    ]
    model(x)
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize(
    "name, shape",
    [
        ("m5", (1, 1024)),
        ("m5", (1, 4096)),
        ("m5", (1, 3001)),
        ("resnet1d", (1, 1)),
        ("resnet1d", (1, 37)),
        ("resnet1d", (1, 2048)),
        ("video-tiny", (3, 8, 8, 8)),
        ("video-tiny", (3, 16, 32, 32)),
        ("video-tiny", (3, 9, 17, 40)),
    ],
)
def test_output_shape_at_any_size_above_the_minimum(name, shape):
    model = zoo.build(name, {"num_classes": 7, "width": 0.25}).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_m5_has_the_papers_layers_and_reductions():
    model = zoo.build("m5").eval()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0]) for c in convs] == [
        (1, 128, 80, 4),
        (128, 128, 3, 1),
        (128, 256, 3, 1),
        (256, 512, 3, 1),
    ]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool1d)]
    assert [p.kernel_size for p in pools] == [4, 4, 4, 4]
    assert model.fc.in_features == 512 and model.fc.out_features == 10
    # L/4 after the stem, then /4 per pool: 4096 -> 1024, 256, 64, 16, 4.
    assert _lengths(model, torch.zeros(1, 1, 4096)) == [(1024,), (256,), (64,), (16,), (4,)]
    with pytest.raises(RuntimeError):  # 1020 samples leave 0 after the last pool
        model(torch.zeros(1, 1, 1020))


def test_resnet1d_stages_and_downsamples():
    model = zoo.build("resnet1d", {"layers": [1, 2, 1, 3]}).eval()
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3, model.layer4)] == [1, 2, 1, 3]
    firsts = [model.layer1[0], model.layer2[0], model.layer3[0], model.layer4[0]]
    assert [b.conv1.stride[0] for b in firsts] == [1, 2, 2, 2]
    assert firsts[0].downsample is None
    for block in firsts[1:]:
        conv = block.downsample[0]
        assert (conv.kernel_size[0], conv.stride[0]) == (1, 2)
    # stem /2, max pool /2, stages 2-4 /2 each: 1024 -> 32; odd lengths round up.
    seen: list[tuple[int, ...]] = []
    model.layer4.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    with torch.no_grad():
        model(torch.zeros(1, 1, 1024))
        model(torch.zeros(1, 1, 1000))
    assert seen == [(1, 512, 32), (1, 512, 32)]
    assert model.fc.in_features == 512


def test_video_tiny_halves_time_and_space_together():
    model = zoo.build("video-tiny").eval()
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool3d)]
    assert len(pools) == 3 and all(p.kernel_size == 2 for p in pools)
    assert _lengths(model, torch.zeros(1, 3, 16, 32, 32)) == [(8, 16, 16), (4, 8, 8), (2, 4, 4)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64]
    with pytest.raises(RuntimeError):  # 7 frames leave 0 after the third pool
        model(torch.zeros(1, 3, 7, 8, 8))


@pytest.mark.parametrize(
    "name, shape",
    [("m5", (1, 2048)), ("resnet1d", (1, 300)), ("video-tiny", (3, 8, 16, 16))],
)
def test_fx_symbolic_trace_gives_the_same_outputs(name, shape):
    model = zoo.build(name, {"width": 0.25}).eval()
    gm = torch.fx.symbolic_trace(model)
    # Every pool is a module of the graph (what the engine rewrites), none hidden in a function.
    pools = [n for n in gm.graph.nodes if n.op == "call_module" and "Pool" in type(gm.get_submodule(n.target)).__name__]
    assert len(pools) == sum("Pool" in type(m).__name__ for m in model.modules())
    x = torch.randn(2, *shape)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
        torch.testing.assert_close(trace(model)(x), model(x), rtol=0, atol=0)  # dynoswap's tracer too


@pytest.mark.parametrize(
    "name, kwargs, check",
    [
        ("m5", {"width": 0.5}, lambda m: m.fc.in_features == 256 and m.features[0].out_channels == 64),
        ("m5", {"in_chans": 2, "num_classes": 3}, lambda m: m.features[0].in_channels == 2 and m.fc.out_features == 3),
        ("m5", {"width": 0.001}, lambda m: m.fc.in_features == 1),  # at least one channel
        ("resnet1d", {"width": 0.25, "in_chans": 40}, lambda m: m.conv1.in_channels == 40 and m.fc.in_features == 128),
        ("resnet1d", {"layers": [3, 4, 6, 3]}, lambda m: len(m.layer3) == 6),
        ("video-tiny", {"width": 2}, lambda m: m.fc.in_features == 128),
        ("video-tiny", {"widths": [4, 4], "in_chans": 1}, lambda m: m.fc.in_features == 4),
    ],
)
def test_architecture_kwargs(name, kwargs, check):
    model = build_model("dynoswap", name, kwargs)
    assert check(model)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("m5", {"width": 0}, "width must be a positive number"),
        ("m5", {"width": float("nan")}, "width must be a positive number"),
        ("m5", {"width": True}, "width must be a positive number"),
        ("m5", {"num_classes": 0}, "must be a whole number"),
        ("resnet1d", {"layers": [2, 2, 2]}, "layers must be 4 block counts"),
        ("resnet1d", {"layers": [2, 0, 2, 2]}, "block count must be a whole number"),
        ("video-tiny", {"in_chans": 0}, "must be a whole number"),
        ("video-tiny", {"widths": []}, "widths must be a non-empty list"),
        ("m5", {"layers": [1, 1, 1, 1]}, "does not take layers"),
        ("resnet1d", {"widths": [8]}, "does not take widths"),
    ],
)
def test_bad_kwargs_are_the_arguments_fault(name, kwargs, match):
    with pytest.raises(ModelError, match=match) as info:
        build_model("dynoswap", name, kwargs)
    assert exit_code_of(info.value) == 2


def test_names_resolve_to_the_zoo_and_listed():
    for name in ("m5", "resnet1d", "video-tiny"):
        assert resolve_source(name).library == "dynoswap"
        assert name in zoo.zoo_names()
    assert isinstance(zoo.build("m5"), M5)
    assert isinstance(zoo.build("resnet1d"), ResNet1d)
    assert isinstance(zoo.build("video-tiny"), VideoTiny)
    assert zoo.get_entry("resnet1d").arch_kwargs == ("num_classes", "in_chans", "width", "layers")
