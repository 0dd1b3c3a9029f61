"""Cost on small hand-built nets: counts against hand formulas, the resolution graph, eq. 7."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dynoswap
from dynoswap.cost import MACS_PER_OUTPUT, count_gmacs, gmacs_loss, resolution_graph, stage_sizes
from dynoswap.layers import DynOPool2d, straight_through_size
from tests.relaxation import central_difference


def vgg_like(widths=(8, 16, 16), scales=(0.5, 0.5, 0.5), tail_stride=2, aggregate="max") -> nn.Sequential:
    """conv-bn-relu-DynOPool stages, a strided conv the model keeps, global pool and fc."""
    layers: list[nn.Module] = []
    c = 3
    for w, r in zip(widths, scales, strict=True):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), DynOPool2d(r, aggregate)]
        c = w
    layers += [nn.Conv2d(c, 16, 3, stride=tail_stride, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers += [nn.Linear(16, 10)]
    return nn.Sequential(*layers)


def hand_count(widths, sizes, tail) -> float:
    """MACs of ``vgg_like`` by hand: fvcore counts conv k*k*Cin*Cout per output pixel, affine BN two
    per element, global average pool one per input element, linear Cin*Cout, DynOPool
    MACS_PER_OUTPUT per output element."""
    macs = 0
    c = 3
    for w, (h_in, w_in), (h_out, w_out) in zip(widths, sizes[:-1], sizes[1:], strict=True):
        macs += 9 * c * w * h_in * w_in + 2 * w * h_in * w_in  # conv + BN at the stage input size
        macs += MACS_PER_OUTPUT * w * h_out * w_out  # DynOPool
        c = w
    macs += 9 * c * 16 * tail[0] * tail[1] + 16 * tail[0] * tail[1] + 16 * 10  # conv, global pool, fc
    return macs / 1e9


def dynopools(model: nn.Module) -> list[DynOPool2d]:
    return [m for m in model.modules() if isinstance(m, DynOPool2d)]


def forward_sizes(model: nn.Module, size: tuple[int, int]) -> list[tuple[int, int]]:
    """Stage sizes as a real forward pass produces them."""
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, *size))
    return [size] + [m.last_out_size for m in dynopools(model)]


def test_count_matches_hand_formula_and_includes_dynopool():
    model = vgg_like()
    count = count_gmacs(model, (64, 48))
    sizes = [(64, 48), (32, 24), (16, 12), (8, 6)]
    assert count.total == pytest.approx(hand_count((8, 16, 16), sizes, (4, 3)), rel=1e-12)
    pool_macs = MACS_PER_OUTPUT * (8 * 32 * 24 + 16 * 16 * 12 + 16 * 8 * 6) / 1e9
    assert count.dynopool == pytest.approx(pool_macs, rel=1e-12)
    assert count.dynopool_share == pytest.approx(pool_macs / count.total)
    assert count.by_layer["3"] == pytest.approx(MACS_PER_OUTPUT * 8 * 32 * 24 / 1e9)
    assert sum(count.by_layer.values()) == pytest.approx(count.total)
    assert count.by_operator["PythonOp.DynOPoolOp"] == pytest.approx(pool_macs)


def test_count_mean_aggregate_batch_and_square_int():
    model = vgg_like(aggregate="mean")
    one = count_gmacs(model, 32)
    assert one.input_size == (32, 32)
    assert one.dynopool == pytest.approx(MACS_PER_OUTPUT * (8 * 16 * 16 + 16 * 8 * 8 + 16 * 4 * 4) / 1e9)
    assert count_gmacs(model, 32, batch=3).total == pytest.approx(3 * one.total)


def test_count_restores_each_module_mode_and_leaves_forward_alone():
    model = vgg_like()
    model.train()
    model[1].eval()
    count_gmacs(model, 32)
    assert model.training and model[0].training and not model[1].training
    assert all("forward" not in vars(m) for m in dynopools(model))
    out = model(torch.randn(2, 3, 32, 32))
    out.sum().backward()  # the counting wrapper is gone: gradients flow again
    assert model[3].alpha.grad is not None


@pytest.mark.parametrize("bad", [(0, 32), (32,), (1, 2, 3), -4])
def test_count_rejects_bad_input_size(bad):
    with pytest.raises(ValueError, match="input_size"):
        count_gmacs(vgg_like(), bad)


def test_loss_equals_count_at_init_and_after_moving():
    model = vgg_like()
    size = (64, 48)
    loss = gmacs_loss(model, size)
    assert loss.item() == pytest.approx(count_gmacs(model, size).total, rel=1e-9)
    for m, r in zip(dynopools(model), [(0.71, 0.37), (0.9, 0.6), (0.45, 0.8)], strict=True):
        m.set_scale(r)
    # Sizes follow the nested rounding rule and what the forward pass produces.
    h1 = (round(64 * 0.71 + 1e-9), math.floor(48 * 0.37 + 0.5))
    assert stage_sizes(model, size)[1] == h1
    assert stage_sizes(model, size) == forward_sizes(model, size)
    assert gmacs_loss(model).item() == pytest.approx(count_gmacs(model, size).total, rel=1e-9)


def test_sizes_chain_through_rounding_and_a_kept_strided_conv():
    model = vgg_like(scales=(0.63, 0.77, 0.41))
    resolution_graph(model, (64, 48))
    for size in [(64, 48), (65, 31), (23, 97)]:
        expected = [size]
        n = torch.tensor(size, dtype=torch.float64)
        for m in dynopools(model):
            n = straight_through_size(n, m.alpha.detach().double())
            expected.append(tuple(int(v) for v in n.tolist()))
        assert stage_sizes(model, size) == expected == forward_sizes(model, size)
        # The kept stride-2 conv (k3, p1): floor((n - 1) / 2) + 1, even for odd sizes.
        tail = resolution_graph(model).int_sizes(size)[-2]
        assert tail == tuple((v - 1) // 2 + 1 for v in expected[-1])


def test_gradient_reaches_every_upstream_alpha_and_matches_relaxation():
    model = vgg_like().double()  # float64 alphas: a finite difference to 1e-7
    graph = resolution_graph(model, (64, 48))
    loss = gmacs_loss(model)
    loss.backward()
    first = dynopools(model)[0].alpha
    assert all(m.alpha.grad is not None and (m.alpha.grad < 0).all() for m in dynopools(model))
    # Central finite difference of the continuous relaxation (the same sum without rounding).
    for axis, slope in enumerate(central_difference(graph, first, eps=1e-6)):
        assert first.grad[axis].item() == pytest.approx(slope, rel=1e-7)
    # The first alpha's gradient includes every later stage: removing them changes it.
    only_first = (
        sum(layer.gmacs_per_pixel for layer in graph.layers if layer.node == graph.dynopools["3"]) * (-64 / 4.0) * 24
    )
    assert first.grad[0].item() < only_first


def test_tied_alphas_receive_the_sum():
    class TwoBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.a, self.b = DynOPool2d(0.5), DynOPool2d(0.5)
            self.ca, self.cb = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(4, 6, 1)

        def forward(self, x):
            x = self.conv(x)
            return self.ca(self.a(x)) + self.cb(self.b(x))

    untied = TwoBranch()
    gmacs_loss(untied, (32, 32)).backward()
    expected = untied.a.alpha.grad + untied.b.alpha.grad
    tied = TwoBranch()
    tied.b.tie_to(tied.a)
    loss = gmacs_loss(tied, (32, 32))
    assert loss.item() == pytest.approx(count_gmacs(tied, 32).total, rel=1e-9)
    loss.backward()
    torch.testing.assert_close(tied.a.alpha.grad, expected)
    assert stage_sizes(tied, 32) == [(32, 32), (16, 16)]  # one stage per tie group
    assert stage_sizes(untied, 32) == [(32, 32), (16, 16), (16, 16)]
    rows = dynoswap.alphas(tied)
    assert [(r["name"], r["group"], r["in_size"], r["out_size"]) for r in rows] == [
        ("a", "a", [32, 32], [16, 16]),
        ("b", "a", [32, 32], [16, 16]),
    ]


def test_param_groups_alphas_once_without_weight_decay():
    model = vgg_like()
    dynopools(model)[2].tie_to(dynopools(model)[1])
    groups = dynoswap.param_groups(model, lr=0.1, alpha_lr=0.01, weight_decay=5e-4)
    weights, alphas = groups
    assert (weights["lr"], weights["weight_decay"]) == (0.1, 5e-4)
    assert (alphas["lr"], alphas["weight_decay"]) == (0.01, 0.0)
    assert [id(p) for p in alphas["params"]] == [id(dynopools(model)[0].alpha), id(dynopools(model)[1].alpha)]
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # accepted as is
    plain = dynoswap.param_groups(nn.Linear(2, 2), lr=0.1, alpha_lr=0.01)
    assert [g["name"] for g in plain] == ["weights"]


def test_alphas_rows_report_scale_and_sizes():
    model = vgg_like(scales=(0.5, 0.75, 0.5))
    rows = dynoswap.alphas(model, (64, 48))
    assert [r["name"] for r in rows] == ["3", "7", "11"]
    assert rows[1]["alpha"] == pytest.approx([4 / 3, 4 / 3])
    assert rows[1]["scale"] == pytest.approx([0.75, 0.75])
    assert [(r["in_size"], r["out_size"]) for r in rows] == [
        ([64, 48], [32, 24]),
        ([32, 24], [24, 18]),
        ([24, 18], [12, 9]),
    ]
    odd = dynoswap.alphas(model, (33, 21))  # sizes at another input, from the same recorded graph
    expected = [([33, 21], [17, 11]), ([17, 11], [13, 8]), ([13, 8], [7, 4])]
    assert [(r["in_size"], r["out_size"]) for r in odd] == expected


def test_missing_reference_size_and_untraceable_model_raise():
    with pytest.raises(ValueError, match="input_size"):
        gmacs_loss(vgg_like())

    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = DynOPool2d()

        def forward(self, x):
            return self.pool(x) if x.sum() > 0 else x  # data-dependent: fx cannot trace it

    with pytest.raises(ValueError, match="convert"):
        gmacs_loss(Dynamic(), (8, 8))


@pytest.mark.gpu
def test_cuda_model_loss_and_count_match_cpu():
    torch.manual_seed(0)
    cpu = vgg_like(scales=(0.63, 0.5, 0.41))
    gpu = vgg_like(scales=(0.63, 0.5, 0.41)).cuda()
    loss_cpu, loss_gpu = gmacs_loss(cpu, (64, 48)), gmacs_loss(gpu, (64, 48))
    assert loss_gpu.device.type == "cuda"
    assert loss_gpu.item() == pytest.approx(loss_cpu.item(), rel=1e-12)
    assert count_gmacs(gpu, (64, 48)).total == pytest.approx(count_gmacs(cpu, (64, 48)).total, rel=1e-12)
    loss_cpu.backward()
    loss_gpu.backward()
    for a, b in zip(dynopools(cpu), dynopools(gpu), strict=True):
        torch.testing.assert_close(b.alpha.grad.cpu(), a.alpha.grad)
    assert stage_sizes(gpu, (65, 31)) == stage_sizes(cpu, (65, 31))


class ModernNet(nn.Module):
    """What timm blocks do: squeeze-excite (mean keepdim), NHWC permute + LayerNorm + Linear,
    a functional pad before a stride-1 conv, a module with children that runs an op itself."""

    class BnAct(nn.BatchNorm2d):
        def __init__(self, c: int) -> None:
            super().__init__(c)
            self.act = nn.ReLU()

        def forward(self, x):
            x = torch.nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias)
            return self.act(x)

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = self.BnAct(8)
        self.pool1 = DynOPool2d(0.5)
        self.se_reduce, self.se_expand = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
        self.down = nn.Conv2d(8, 12, 2)  # after a +1 pad: a patchify conv turned stride 1
        self.pool2 = DynOPool2d(0.5)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = self.pool1(self.bn(self.stem(x)))
        x = x * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(x.mean((2, 3), keepdim=True)))))
        x = self.fc(self.norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = self.pool2(self.down(torch.nn.functional.pad(x, (0, 1, 0, 1))))
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))


def test_loss_tracks_count_through_timm_style_ops():
    model = ModernNet()
    graph = resolution_graph(model, (48, 40))
    assert gmacs_loss(model).item() == pytest.approx(count_gmacs(model, (48, 40)).total, rel=1e-12)
    # The SE convs run at 1x1 whatever the stage size: a constant.
    const_layers = {layer.name for layer in graph.layers} ^ set(count_gmacs(model, (48, 40)).by_layer)
    assert {"se_reduce", "se_expand", "head"} <= const_layers
    # A module with children counts its own op (batch_norm): 2 per element at 48x40.
    assert count_gmacs(model, (48, 40)).by_layer["bn"] == pytest.approx(2 * 8 * 48 * 40 / 1e9)
    for r1, r2 in [((0.71, 0.37), (0.9, 0.6)), ((1.3, 0.45), (0.5, 0.8))]:
        model.pool1.set_scale(r1)
        model.pool2.set_scale(r2)
        for size in [(48, 40), (37, 53)]:
            assert graph.gmacs(size).item() == pytest.approx(count_gmacs(model, size).total, rel=1e-12)
            assert stage_sizes(model, size) == forward_sizes(model, size)


@settings(max_examples=10, deadline=None)
@given(
    scales=st.lists(st.tuples(st.floats(0.2, 1.6), st.floats(0.2, 1.6)), min_size=3, max_size=3),
    size=st.tuples(st.integers(9, 70), st.integers(9, 70)),
)
def test_any_scales_and_size_loss_is_the_count_and_sizes_are_the_forward(scales, size):
    model = vgg_like(widths=(4, 4, 4))
    graph = resolution_graph(model, (32, 32))
    for m, r in zip(dynopools(model), scales, strict=True):
        m.set_scale(r)
    assert stage_sizes(model, size) == forward_sizes(model, size)
    assert graph.gmacs(size).item() == pytest.approx(count_gmacs(model, size).total, rel=1e-12)


def test_loss_answers_for_the_size_asked_in_any_order():
    import torchvision

    gm, _ = dynoswap.convert(torchvision.models.resnet18(num_classes=10), (64, 64))
    for size in [(64, 64), (32, 32), (48, 40), (64, 64)]:
        assert gmacs_loss(gm, size).item() == pytest.approx(count_gmacs(gm, size).total, rel=1e-9), size


class UpsampleMerge(nn.Module):
    """Two branches: a stride-2 conv, and a further stride-2 conv upsampled x2 back onto it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, 2, 1)
        self.b = nn.Conv2d(8, 8, 3, 2, 1)
        self.c = nn.Conv2d(8, 8, 3, 1, 1)
        self.up = nn.Upsample(scale_factor=2)

    def forward(self, x):
        a = self.a(x)
        return self.c(a + self.up(self.b(a)))


def test_upsampling_that_takes_its_partners_size_is_costed_at_that_size():
    gm, report = dynoswap.convert(UpsampleMerge(), (48, 48))
    assert report.resized_to_partner == ["up"] and report.groups == [["a_dynopool"], ["b_dynopool"]]
    for scales in [((1 / 3, 0.4), (0.6, 0.7)), ((0.8, 0.35), (1.4, 0.5))]:
        for m, r in zip(dynopools(gm), scales, strict=True):
            m.set_scale(r)
        for size in [(48, 48), (37, 53)]:
            assert gmacs_loss(gm, size).item() == pytest.approx(count_gmacs(gm, size).total, rel=1e-9)
    # The upsampled branch is its partner's node, not "b's size times 2": no node of its own, so no
    # drift once scales move and no gradient to b's alpha through it.
    graph = resolution_graph(gm)
    assert [n.kind for n in graph.nodes if n.kind != "const"] == ["input", "dynopool", "dynopool"]
