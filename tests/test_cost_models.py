"""Cost of torchvision models at ImageNet size: fvcore's figures, converted VGG-16 / ResNet-50.

Each model is built, converted and counted once per module (fixtures): these are the
expensive tests of the cost package.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from dynoswap.cost import (
    MACS_PER_OUTPUT,
    count_gmacs,
    gmacs_loss,
    original_stage_sizes,
    resolution_graph,
    stage_sizes,
)
from dynoswap.engine import convert
from dynoswap.layers import DynOPool2d
from tests.relaxation import central_difference

SIZE = (224, 224)
IMAGENET_STAGES = [(224, 224), (112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]


def dynopools(model: torch.nn.Module) -> list[tuple[str, DynOPool2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DynOPool2d)]


@pytest.fixture(scope="module")
def originals() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {name: getattr(torchvision.models, name)(num_classes=1000) for name in ("resnet50", "mobilenet_v2", "vgg16")}


@pytest.fixture(scope="module")
def counts(originals):
    return {name: count_gmacs(model, SIZE) for name, model in originals.items()}


@pytest.fixture(scope="module")
def vgg(originals):
    gm, _ = convert(originals["vgg16"], input_size=SIZE)
    return gm


@pytest.fixture(scope="module")
def resnet(originals):
    gm, _ = convert(originals["resnet50"], input_size=SIZE)
    return gm


@pytest.mark.parametrize(("name", "expected"), [("resnet50", 4.11), ("mobilenet_v2", 0.31), ("vgg16", 15.45)])
def test_human_designed_counts_match_fvcore_figures(counts, name, expected):
    count = counts[name]
    assert count.total == pytest.approx(expected, rel=0.015)
    assert count.dynopool == 0.0 and count.input_size == SIZE


def test_vgg16_converted_stages_loss_and_dynopool_count(vgg, counts):
    assert len(dynopools(vgg)) == 5
    assert stage_sizes(vgg) == IMAGENET_STAGES
    count = count_gmacs(vgg, SIZE)
    assert gmacs_loss(vgg).item() == pytest.approx(count.total, rel=1e-9)
    assert count.by_operator["conv"] == counts["vgg16"].by_operator["conv"]  # pool -> DynOPool adds no conv MACs
    pooled = 64 * 112**2 + 128 * 56**2 + 256 * 28**2 + 512 * 14**2 + 512 * 7**2
    assert count.dynopool * 1e9 == MACS_PER_OUTPUT * pooled


def test_vgg16_moving_scales_changes_count_as_stage_sizes_predict(vgg, counts):
    pools = [m for _, m in dynopools(vgg)]
    graph = resolution_graph(vgg)
    try:
        for m, r in zip(pools, [(0.6, 0.45), (0.55, 0.5), (0.4, 0.62), (0.5, 0.35), (0.75, 0.5)], strict=True):
            m.set_scale(r)
        sizes = stage_sizes(vgg)
        assert sizes == [(224, 224), (134, 101), (74, 51), (30, 32), (15, 11), (11, 6)]
        moved = count_gmacs(vgg, SIZE)  # runs the network: the DynOPools record what they produced
        assert [m.last_out_size for m in pools] == sizes[1:]
        # VGG's resolution nodes are the input and the five stages; each layer's cost per pixel times its area.
        assert {layer.node for layer in graph.layers} == set(range(6))
        expected = sum(layer.gmacs_per_pixel * sizes[layer.node][0] * sizes[layer.node][1] for layer in graph.layers)
        assert moved.total == pytest.approx(expected + graph.const_gmacs, rel=1e-9)
        assert gmacs_loss(vgg).item() == pytest.approx(moved.total, rel=1e-9)
    finally:
        for m in pools:
            m.set_scale(0.5)
    assert stage_sizes(vgg) == IMAGENET_STAGES
    assert count_gmacs(vgg, SIZE).by_operator["conv"] == counts["vgg16"].by_operator["conv"]


def test_vgg16_first_alpha_gradient_accounts_for_every_later_stage(vgg):
    graph = resolution_graph(vgg)
    first = dynopools(vgg)[0][1].alpha
    first.grad = None
    gmacs_loss(vgg).backward()
    grad = first.grad.clone()
    # alpha = 2 +- 2**-7 is exact in float32
    for axis, slope in enumerate(central_difference(graph, first, eps=2.0**-7)):
        assert grad[axis].item() == pytest.approx(slope, rel=1e-4)
    # Stage 1 alone: d(c1 * 224/a_h * 112)/d a_h = -c1 * 224 / 4 * 112; the later stages add ~as much again.
    c1 = sum(layer.gmacs_per_pixel for layer in graph.layers if layer.node == 1)
    assert grad[0].item() < 1.5 * (-c1 * 224 / 4 * 112)
    first.grad = None


def test_resnet50_converted_ties_stages_and_loss(resnet, counts):
    pools = dynopools(resnet)
    assert len(pools) == 7 and len({id(m.alpha) for _, m in pools}) == 4
    assert stage_sizes(resnet) == [(224, 224), (56, 56), (28, 28), (14, 14), (7, 7)]
    count = count_gmacs(resnet, SIZE)
    assert gmacs_loss(resnet).item() == pytest.approx(count.total, rel=1e-9)
    pooled = 64 * 56**2 + (128 + 512) * 28**2 + (256 + 1024) * 14**2 + (512 + 2048) * 7**2
    assert count.dynopool * 1e9 == MACS_PER_OUTPUT * pooled
    # Non-square inputs evaluate from the same recorded graph.
    assert stage_sizes(resnet, (160, 96)) == [(160, 96), (40, 24), (20, 12), (10, 6), (5, 3)]


def test_stage_sizes_of_unconverted_models_convert_a_copy(originals):
    model = originals["resnet50"]
    assert stage_sizes(model, (224, 224)) == [(224, 224), (56, 56), (28, 28), (14, 14), (7, 7)]
    assert not dynopools(model)  # the original is left alone


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "convnext_atto"])
def test_timm_converted_loss_equals_count_after_moving(name):
    import timm

    gm, _ = convert(timm.create_model(name, pretrained=False, num_classes=10), input_size=(64, 64))
    assert gmacs_loss(gm).item() == pytest.approx(count_gmacs(gm, (64, 64)).total, rel=1e-9)
    pools = [m for _, m in dynopools(gm)]
    for i, m in enumerate(pools):
        m.set_scale((0.5 + 0.07 * (i % 3), 0.45))
    moved = count_gmacs(gm, (64, 64))
    assert {m.last_out_size for m in pools} == set(stage_sizes(gm)[1:])  # predicted = what the forward produced
    assert gmacs_loss(gm).item() == pytest.approx(moved.total, rel=1e-9)


def test_plain_model_stages_are_what_the_original_layers_output_at_odd_sizes():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10).eval()
    size = (97, 131)  # pools floor where DynOPool rounds: at 1/4 the converted stem would give 24x33, not 25x33
    outputs = []
    hooks = [
        getattr(model, f"layer{i}").register_forward_hook(lambda _m, _i, out: outputs.append(tuple(out.shape[-2:])))
        for i in range(1, 5)
    ]
    with torch.no_grad():
        model(torch.zeros(1, 3, *size))
    for hook in hooks:
        hook.remove()
    assert outputs[0] == (25, 33)
    assert stage_sizes(model, size) == [size, *outputs]
    gm, report = convert(model, size)
    # Exact geometry at init: the stem's alpha is set to n_in / n_out where 1/stride would round differently.
    assert stage_sizes(gm) == [size, *outputs]
    assert original_stage_sizes(gm, report) == [size, *outputs]
    stem = report.replacements[0]
    assert stem.note.startswith("padding/kernel on 97x131: init alpha 3.88x") and stem.was["padding"] == [3, 3]
