"""torchvision detectors: the backbone converted in place trains with targets, evaluates, and its anchors follow it."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.models.detection as detection
from torch import fx, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from dynoswap.cost import count_gmacs, gmacs_loss
from dynoswap.engine import convert
from dynoswap.engine.anchors import FloatScaleRoIAlign, FloatStrideAnchorGenerator
from dynoswap.io.recipe import recipe_of
from dynoswap.layers import DynOPool2d

SIDE = 128
#: Fewer proposals and detections than torchvision's defaults: the same code paths, less CPU time.
RCNN = {
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
    "box_batch_size_per_image": 32,
    "box_detections_per_img": 10,
}
DENSE = {"detections_per_img": 10, "topk_candidates": 100, "score_thresh": 0.0}  # random heads score ~0.01
slow = pytest.mark.slow
# name: (extra builder kwargs, the backbone's input side)
DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_fpn": ({**RCNN, "min_size": SIDE, "max_size": SIDE}, SIDE),
    "ssdlite320_mobilenet_v3_large": ({"detections_per_img": 10, "topk_candidates": 50}, 320),
    "fasterrcnn_resnet50_fpn": ({**RCNN, "min_size": SIDE, "max_size": SIDE}, SIDE),
    "retinanet_resnet50_fpn": ({**DENSE, "min_size": SIDE, "max_size": SIDE}, SIDE),
    "fcos_resnet50_fpn": ({**DENSE, "min_size": SIDE, "max_size": SIDE}, SIDE),
    "maskrcnn_resnet50_fpn": ({**RCNN, "min_size": SIDE, "max_size": SIDE}, SIDE),
    "keypointrcnn_resnet50_fpn": ({**RCNN, "min_size": SIDE, "max_size": SIDE, "num_keypoints": 3}, SIDE),
}
FAST = ("fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large")


def build(name: str) -> tuple[nn.Module, int]:
    extra, side = DETECTORS[name]
    classes = 2 if name.startswith("keypoint") else 3
    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, num_classes=classes, **extra)
    return model, side


def target(name: str, side: int) -> dict[str, torch.Tensor]:
    k = side / SIDE
    data = {"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]) * k, "labels": torch.tensor([1])}
    if name.startswith("mask"):
        data["masks"] = torch.zeros(1, side, side, dtype=torch.uint8)
        data["masks"][0, int(20 * k) : int(90 * k), int(10 * k) : int(60 * k)] = 1
    if name.startswith("keypoint"):
        data["keypoints"] = torch.tensor([[[20.0, 30.0, 1.0], [40.0, 50.0, 1.0], [30.0, 80.0, 1.0]]]) * k
        data["keypoints"][..., 2] = 1.0
    return data


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=slow) for n in DETECTORS])
def test_a_detector_trains_its_converted_backbone_and_evaluates(name: str) -> None:
    model, side = build(name)
    whole, report = convert(model, (side, side), submodule="backbone")
    assert isinstance(whole.backbone, fx.GraphModule) and report.num_dynopools > 0
    has_anchors = any(type(m) is AnchorGenerator for m in model.modules())
    assert recipe_of(whole).options.anchors == ("float" if has_anchors else None)
    assert not any(type(m) is AnchorGenerator for m in whole.modules())
    # The cost term of eq. 8 on the part equals fvcore's count of it.
    cost = gmacs_loss(whole.backbone)
    assert float(cost.detach()) == pytest.approx(count_gmacs(whole.backbone, (side, side)).total, rel=1e-6)
    image = torch.rand(3, side, side, generator=torch.Generator().manual_seed(1))
    whole.train()
    losses = whole([image], [target(name, side)])
    assert losses and all(math.isfinite(float(v)) for v in losses.values())
    (sum(losses.values()) + 0.1 * cost).backward()
    leaders = [m for m in whole.modules() if isinstance(m, DynOPool2d) and m.leader is m]
    assert len(leaders) == report.num_alphas
    for pool in leaders:
        assert pool.alpha.grad is not None and bool(torch.isfinite(pool.alpha.grad).all())
    assert any(bool(pool.alpha.grad.abs().sum() > 0) for pool in leaders)
    whole.eval()
    with torch.no_grad():
        (found,) = whole([image])
    boxes = found["boxes"]
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and boxes.shape[0] == found["scores"].shape[0] > 0
    assert bool((boxes >= 0).all()) and bool((boxes <= side).all())


# -- anchors follow the learned sizes ------------------------------------------------------
#: Scales (r_h, r_w) per tie group, none of them 1/2: every level's grid stops dividing the image.
MOVED = [(0.45, 0.6), (0.55, 0.42), (0.6, 0.55), (0.43, 0.58), (0.57, 0.47), (0.52, 0.61)]


def _anchor_centres(anchors: torch.Tensor, grid: tuple[int, int], per_cell: int) -> torch.Tensor:
    """(h, w, per_cell, 2) centres (x, y) of one level's anchors, in torchvision's order."""
    centres = torch.stack(((anchors[:, 0] + anchors[:, 2]) / 2, (anchors[:, 1] + anchors[:, 3]) / 2), dim=1)
    return centres.reshape(grid[0], grid[1], per_cell, 2)


def _levels(whole: nn.Module) -> tuple[object, list[torch.Tensor]]:
    image = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(2))
    whole.eval()
    with torch.no_grad():
        images, _ = whole.transform([image])
        features = list(whole.backbone(images.tensors).values())
    return images, features


def test_anchor_centres_land_on_the_feature_grid_after_the_scales_move() -> None:
    model, _ = build("fasterrcnn_mobilenet_v3_large_fpn")
    whole, report = convert(model, (SIDE, SIDE), submodule="backbone")
    generator = whole.rpn.anchor_generator
    assert isinstance(generator, FloatStrideAnchorGenerator)
    stock = AnchorGenerator(generator.sizes, generator.aspect_ratios)
    # At the conversion's scales every grid divides the image: exactly torchvision's anchors.
    images, features = _levels(whole)
    assert all(torch.equal(a, b) for a, b in zip(generator(images, features), stock(images, features), strict=True))
    leaders = [m for m in whole.backbone.modules() if isinstance(m, DynOPool2d) and m.leader is m]
    assert len(leaders) == report.num_alphas == len(MOVED)
    for pool, scale in zip(leaders, MOVED, strict=True):
        pool.set_scale(scale)
    images, features = _levels(whole)
    height, width = images.tensors.shape[-2:]
    grids = [tuple(f.shape[-2:]) for f in features]
    assert any(height % h or width % w for h, w in grids), grids  # the test means something
    ours, theirs = generator(images, features)[0], stock(images, features)[0]
    per_cell = generator.num_anchors_per_location()
    start, worst_stock = 0, 0.0
    for (h, w), a in zip(grids, per_cell, strict=True):
        count = h * w * a
        got = _anchor_centres(ours[start : start + count], (h, w), a)
        old = _anchor_centres(theirs[start : start + count], (h, w), a)
        start += count
        # Cell (i, j) of an h x w grid over the image: torchvision's anchor point j * W / w, i * H / h.
        rows = torch.arange(h, dtype=torch.float64) * (height / h)
        cols = torch.arange(w, dtype=torch.float64) * (width / w)
        want = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=-1)[:, :, None, :].expand(h, w, a, 2)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)
        # The grid spans the image: one stride past the last anchor point is the image's far edge.
        assert float(got[-1, -1, 0, 0]) + width / w == pytest.approx(width, abs=1e-4)
        worst_stock = max(worst_stock, float((old.double() - want).abs().max()))
    assert start == ours.shape[0]
    assert worst_stock > 2.0  # torchvision's integer strides miss by pixels (2.4 here)
    # A training step still runs at the moved scales (anchors and features agree in number).
    whole.train()
    losses = whole([torch.rand(3, SIDE, SIDE)], [target("fasterrcnn_mobilenet_v3_large_fpn", SIDE)])
    assert all(math.isfinite(float(v)) for v in losses.values())


def test_roi_pooling_samples_each_level_at_its_learned_scale() -> None:
    model, _ = build("fasterrcnn_mobilenet_v3_large_fpn")
    whole, report = convert(model, (SIDE, SIDE), submodule="backbone")
    pooler = whole.roi_heads.box_roi_pool
    assert isinstance(pooler, FloatScaleRoIAlign) and pooler.size_divisible == 32
    assert not any(type(m) is MultiScaleRoIAlign for m in whole.modules())

    def stock() -> MultiScaleRoIAlign:  # a fresh one: torchvision's keeps the first scales it sees
        return MultiScaleRoIAlign(pooler.featmap_names, pooler.output_size, pooler.sampling_ratio)

    boxes = [torch.tensor([[20.0, 30.0, 70.0, 90.0], [8.0, 12.0, 90.0, 84.0]])]  # inside every level's last cell
    shapes = [(SIDE, SIDE)]
    _, features = _levels(whole)
    named = dict(zip(("0", "1", "pool"), features, strict=True))
    # Where every grid divides the image: exactly torchvision's pooling.
    assert torch.equal(pooler(named, boxes, shapes), stock()(named, boxes, shapes))
    for name, scale in zip((g[0] for g in report.groups), MOVED, strict=True):
        whole.backbone.get_submodule(name).set_scale(scale)
    _, features = _levels(whole)
    grids = [tuple(f.shape[-2:]) for f in features]
    assert any(SIDE % h or SIDE % w for h, w in grids[:2]), grids
    # Coordinate maps: cell (i, j) of an h x w level holds its image point (j * W / w, i * H / h), so RoIAlign
    # of a box gives the image coordinates of its bins' centres when, and only when, the scale is right.
    maps = {}
    for key, (h, w) in zip(("0", "1", "pool"), grids, strict=True):
        xs = torch.arange(w, dtype=torch.float32) * (SIDE / w)
        ys = torch.arange(h, dtype=torch.float32) * (SIDE / h)
        maps[key] = torch.stack((xs.expand(h, w), ys[:, None].expand(h, w)))[None]
    bins = pooler.output_size[0]
    centre = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    want_x = torch.stack([b[0] + centre * (b[2] - b[0]) for b in boxes[0]])[:, None, :].expand(-1, bins, -1)
    want_y = torch.stack([b[1] + centre * (b[3] - b[1]) for b in boxes[0]])[:, :, None].expand(-1, -1, bins)
    got = pooler(maps, boxes, shapes)
    torch.testing.assert_close(got[:, 0], want_x, rtol=0, atol=1e-3)
    torch.testing.assert_close(got[:, 1], want_y, rtol=0, atol=1e-3)
    old = stock()(maps, boxes, shapes)
    miss = float(torch.maximum((old[:, 0] - want_x).abs(), (old[:, 1] - want_y).abs()).max())
    assert miss > 10.0  # power-of-two scales: 17 px here
