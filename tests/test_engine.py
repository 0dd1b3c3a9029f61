"""Engine: rules (exact against pooling references), merging, tying, names, options, errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dynoswap.engine import ConversionError, TieError, TraceError, convert
from dynoswap.layers import DynOPool2d


def dynopools(gm: nn.Module) -> dict[str, DynOPool2d]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, DynOPool2d)}


def leaders(gm: nn.Module) -> list[DynOPool2d]:
    return [m for m in dynopools(gm).values() if m.leader is m]


def capture(module: nn.Module) -> dict[str, torch.Tensor]:
    box: dict[str, torch.Tensor] = {}
    module.register_forward_hook(lambda m, i, o: box.__setitem__("out", o))
    return box


class ConvAct(nn.Module):
    def __init__(self, stride: int = 2, kernel: int = 3, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel, stride, padding)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


# -- rules, exact against the pooling they reduce to at init ----------------------------
# At scale 1/2 on an even axis the four query points of a cell hit the pixels (2k, 2k+1) exactly,
# so DynOPool(max) == max_pool2d(2); at 1/4 they sit at 4k+0.5 and 4k+2.5, i.e. the max of 2x2 means.
def test_conv_post_rule_is_maxpool_after_activation_of_stride1_conv() -> None:
    torch.manual_seed(0)
    model = ConvAct()
    gm, report = convert(model, (16, 16))
    x = torch.randn(2, 3, 16, 16)
    ref = F.max_pool2d(F.relu(F.conv2d(x, model.conv.weight, model.conv.bias, 1, 1)), 2)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-6)
    assert [r.rule for r in report.replacements] == ["conv_post"]
    assert report.replacements[0].dynopool == "conv_dynopool"
    assert "stride 1" in report.replacements[0].cost_note


def test_conv_pre_rule_pools_before_stride1_conv() -> None:
    torch.manual_seed(0)
    model = ConvAct()
    gm, report = convert(model, (16, 16), placement="pre")
    x = torch.randn(2, 3, 16, 16)
    ref = F.relu(F.conv2d(F.max_pool2d(x, 2), model.conv.weight, model.conv.bias, 1, 1))
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-6)
    assert report.replacements[0].rule == "conv_pre"


def test_even_kernel_strided_conv_runs_with_same_padding() -> None:
    torch.manual_seed(0)
    model = ConvAct(stride=2, kernel=4, padding=1)
    gm, _ = convert(model, (16, 16))
    x = torch.randn(1, 3, 16, 16)
    ref = F.max_pool2d(F.relu(F.conv2d(F.pad(x, (1, 2, 1, 2)), model.conv.weight, model.conv.bias)), 2)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-6)
    assert gm.get_submodule("conv").padding == (0, 0)


@pytest.mark.parametrize(
    ("pool", "reference"),
    [(nn.MaxPool2d(2), lambda x: F.max_pool2d(x, 2)), (nn.AvgPool2d(2), lambda x: F.avg_pool2d(x, 2))],
)
def test_pool_rule_removes_pool(pool: nn.Module, reference) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), pool)
    gm, report = convert(model, (8, 8))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), reference(model[0](x)), rtol=0, atol=1e-6)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in gm.modules())
    assert report.replacements[0].rule == "pool" and report.replacements[0].init_scale == (0.5, 0.5)


def test_functional_pool_is_a_resizer() -> None:
    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    gm, report = convert(Net(), (8, 8))
    assert report.num_dynopools == 1 and report.replacements[0].was["op"] == "max_pool2d"
    assert gm(torch.randn(1, 2, 8, 8)).shape == (1, 2, 4, 4)


def test_stride1_and_global_pools_are_kept() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.MaxPool2d(3, 1, 1), nn.AdaptiveAvgPool2d(1))
    gm, report = convert(model, (8, 8))
    assert report.status == "nothing to convert" and report.num_dynopools == 0
    assert [s.op for s in report.skipped] == ["AdaptiveAvgPool2d"]
    assert "adaptive" in report.skipped[0].reason


def test_patchify_post_and_skip() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 4, 4), nn.GELU())
    gm, report = convert(model, (16, 16))
    x = torch.randn(1, 3, 16, 16)
    # Each stride-1 output is still the embedding of one 4x4 patch ('same' pads 1 left/top, 2 right/bottom).
    stem = F.gelu(F.conv2d(F.pad(x, (1, 2, 1, 2)), model[0].weight, model[0].bias))
    ref = F.max_pool2d(F.avg_pool2d(stem, 2), 2)
    torch.testing.assert_close(gm(x), ref, rtol=0, atol=1e-5)
    assert report.replacements[0].rule == "patchify_post" and report.replacements[0].init_scale == (0.25, 0.25)
    gm2, report2 = convert(model, (16, 16), patchify="skip")
    assert report2.num_dynopools == 0 and "patchify" in report2.skipped[0].reason
    torch.testing.assert_close(gm2(x), model(x))


# -- torchvision ResNet-50: the canonical case ----------------------------------------
@pytest.fixture(scope="module")
def resnet50() -> tuple[nn.Module, nn.Module, object]:
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10)
    gm, report = convert(model, (224, 224))
    return model, gm, report


def test_resnet50_sites_and_tying(resnet50) -> None:
    model, gm, report = resnet50
    names = list(dynopools(gm))
    assert sorted(names) == sorted(
        ["conv1_dynopool"] + [f"layer{i}.0.{n}_dynopool" for i in (2, 3, 4) for n in ("conv2", "downsample.0")]
    )
    assert len(leaders(gm)) == 4
    stem = report.replacements[0]
    assert stem.dynopool == "conv1_dynopool" and stem.init_scale == (0.25, 0.25)
    assert [m["name"] for m in stem.merged] == ["maxpool"]
    assert not any(isinstance(m, nn.MaxPool2d) for m in gm.modules())
    for i in (2, 3, 4):
        main = gm.get_submodule(f"layer{i}.0.conv2_dynopool")
        short = gm.get_submodule(f"layer{i}.0.downsample.0_dynopool")
        assert short.alpha is main.alpha and short.leader is main
        assert gm.get_submodule(f"layer{i}.0.conv2").stride == (1, 1)
    assert report.groups[1] == ["layer2.0.conv2_dynopool", "layer2.0.downsample.0_dynopool"]


def test_resnet50_keys_and_output(resnet50) -> None:
    model, gm, _ = resnet50
    orig, new = set(model.state_dict()), set(gm.state_dict())
    assert orig <= new
    assert new - orig == {f"{n}.alpha" for n in ("conv1_dynopool", *(f"layer{i}.0.conv2_dynopool" for i in (2, 3, 4)))}
    # An original checkpoint loads with the alphas as the only missing keys.
    missing, unexpected = gm.load_state_dict(model.state_dict(), strict=False)
    assert sorted(missing) == sorted(new - orig) and not unexpected
    x = torch.randn(1, 3, 224, 224)
    model.eval(), gm.eval()
    assert gm(x).shape == model(x).shape
    assert model.conv1.stride == (2, 2) and any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_resnet50_stem_is_max_of_means(resnet50) -> None:
    model, gm, _ = resnet50
    gm.eval(), model.eval()
    box = capture(gm.get_submodule("conv1_dynopool"))
    x = torch.randn(1, 3, 64, 64)
    gm(x)
    stem = F.relu(model.bn1(F.conv2d(x, model.conv1.weight, None, 1, 3)))
    torch.testing.assert_close(box["out"], F.max_pool2d(F.avg_pool2d(stem, 2), 2), rtol=1e-5, atol=1e-5)


def test_names_and_order_are_stable() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    a, _ = convert(model, (64, 64))
    b, _ = convert(model, (64, 64))
    assert [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()]
    assert list(a.state_dict()) == list(b.state_dict())
    assert a.code == b.code


def test_recipe_is_json_and_survives_deepcopy() -> None:
    gm, report = convert(
        torchvision.models.resnet18(num_classes=10),
        (64, 64),
        source={"library": "torchvision", "name": "resnet18", "kwargs": {"num_classes": 10}},
    )
    recipe = gm.meta["dynoswap"]
    assert json.loads(json.dumps(recipe)) == recipe
    assert recipe["source"]["name"] == "resnet18" and recipe["input_size"] == [64, 64]
    assert recipe["groups"] == report.groups and len(recipe["replacements"]) == 7
    assert copy.deepcopy(gm).meta["dynoswap"] == recipe
    assert json.loads(json.dumps(report.to_dict()))["status"] == "converted"
    assert report.table().row_count == 7 + len(report.skipped)


# -- options --------------------------------------------------------------------------
def test_init_scale_and_overrides() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    gm, _ = convert(model, (64, 64), init_scale=0.7)
    assert all(p.scale == pytest.approx((0.7, 0.7)) for p in leaders(gm))
    gm, _ = convert(model, (64, 64), overrides={"conv1": 0.6, "layer3.0.downsample.0_dynopool": (0.8, 0.5)})
    assert gm.get_submodule("conv1_dynopool").scale == pytest.approx((0.6, 0.6))
    # An override on one member moves its whole tie group (BasicBlock strides in conv1).
    assert gm.get_submodule("layer3.0.conv1_dynopool").scale == pytest.approx((0.8, 0.5))
    assert gm.get_submodule("layer2.0.conv1_dynopool").scale == pytest.approx((0.5, 0.5))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"nope": 0.5}, "names no replaced resizer"),
        ({"maxpool": 0.5}, "merged into 'conv1_dynopool'"),
        ({"layer2.0.conv1": 0.5, "layer2.0.downsample.0": 0.6}, "disagree within one tie group"),
        ({"conv1": -1.0}, "finite, > 0 and at most 8"),
        ({"conv1": 1e30}, "finite, > 0 and at most 8"),
    ],
)
def test_bad_overrides(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        convert(torchvision.models.resnet18(num_classes=10), (64, 64), overrides=overrides)


def test_sizes_hit_targets_exactly() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    targets = [(23, 19), (13, 11), (7, 5), (3, 3)]
    gm, _ = convert(model, (97, 90), sizes=targets)
    gm.eval()
    with torch.no_grad():
        gm(torch.randn(1, 3, 97, 90))
    names = ("conv1_dynopool", "layer2.0.conv1_dynopool", "layer3.0.conv1_dynopool", "layer4.0.conv1_dynopool")
    outs = [gm.get_submodule(n).last_out_size for n in names]
    assert outs == targets
    assert gm.get_submodule("layer2.0.downsample.0_dynopool").last_out_size == (13, 11)
    assert gm.get_submodule("conv1_dynopool").alpha.tolist() == pytest.approx([97 / 23, 90 / 19])
    with pytest.raises(ValueError, match="4 tie groups"):
        convert(model, (97, 90), sizes=targets[:3])


def test_bad_placement() -> None:
    with pytest.raises(ValueError, match="placement"):
        convert(ConvAct(), (8, 8), placement="middle")


# -- tying ----------------------------------------------------------------------------
class TwoStream(nn.Module):
    """A high-res stream merged with an upsampled low-res one (HRNet-style fuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1)
        self.down = nn.Conv2d(4, 4, 3, 2, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.down2 = nn.Sequential(nn.Conv2d(4, 4, 3, 2, 1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hi = self.stem(x)
        lo = self.down(hi)
        hi2 = hi + self.up(lo)
        return torch.cat([lo, self.down2(hi2)], 1)


def test_upsample_feeding_a_merge_resizes_to_partner_and_streams_tie() -> None:
    gm, report = convert(TwoStream(), (16, 16))
    assert report.resized_to_partner == ["up"]
    assert report.groups == [["down_dynopool", "down2.0_dynopool"]]
    with torch.no_grad():
        gm.get_submodule("down_dynopool").alpha.copy_(torch.tensor([1.7, 3.1]))
    out = gm(torch.randn(2, 3, 16, 16))
    assert out.shape == (2, 8, round(16 / 1.7), round(16 / 3.1))


def test_inception_reduction_branches_share_one_alpha() -> None:
    model = torchvision.models.inception_v3(num_classes=10, aux_logits=False, init_weights=False)
    gm, report = convert(model, (128, 128))
    group = next(g for g in report.groups if "Mixed_6a.branch3x3.conv_dynopool" in g)
    assert sorted(group) == sorted(
        ["Mixed_6a.branch3x3.conv_dynopool", "Mixed_6a.branch3x3dbl_3.conv_dynopool", "Mixed_6a.max_pool2d_dynopool"]
    )


def test_untieable_merge_fails_naming_both_nodes() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)
            self.pos = nn.Parameter(torch.zeros(1, 4, 8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + self.pos

    with pytest.raises(
        TieError,
        match=r"'add' combines 'conv_dynopool' \(resolution conv_dynopool\(input\)\) with 'pos' of fixed shape",
    ) as info:
        convert(Net(), (16, 16))
    assert info.value.category == "fixed position embedding" and info.value.node == "add"


def test_model_breaking_when_alpha_moves_is_not_convertible() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).reshape(-1, 4, 8, 8)  # a reshape to a fixed size

    with pytest.raises(ConversionError, match="not convertible: .* at 'reshape'") as info:
        convert(Net(), (16, 16))
    assert info.value.category == "fixed window partition"


# -- tracing errors -------------------------------------------------------------------
class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:  # data-dependent control flow: fx cannot trace this
            return x
        return -x


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.gate = Gate()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.gate(self.conv(x)))


def test_trace_error_names_module_line_and_fix() -> None:
    with pytest.raises(TraceError) as info:
        convert(Gated(), (16, 16))
    err = info.value
    assert err.module == "gate"
    assert "test_engine.py" in err.line and "if x.mean() > 0" in err.line
    assert "leaf_modules=['gate']" in str(err) and "Traceback" not in str(err)


@pytest.mark.parametrize("leaf", ["gate", Gate])
def test_leaf_modules_fix_tracing(leaf) -> None:
    model = Gated()
    gm, report = convert(model, (16, 16), leaf_modules=[leaf])
    assert report.num_dynopools == 2
    x = torch.randn(1, 3, 16, 16)
    assert gm(x).shape == model(x).shape == (1, 4, 4, 4)


def test_timm_same_padding_conv_runs_at_stride_one() -> None:
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU(), MaxPool2dSame(3, stride=2))
    gm, report = convert(model, (16, 16))
    assert [r.rule for r in report.replacements] == ["conv_post"]
    assert report.replacements[0].merged[0]["op"] == "MaxPool2dSame"
    x = torch.randn(1, 3, 16, 16)
    conv = model[0]
    ref = F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1)), conv.weight, conv.bias))
    torch.testing.assert_close(gm(x), F.max_pool2d(F.avg_pool2d(ref, 2), 2), rtol=0, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(n_h=st.integers(5, 40), n_w=st.integers(5, 40))
def test_stride2_sites_match_original_geometry(n_h: int, n_w: int) -> None:
    # k3 s2 p1 convs and pools give ceil(n/2); DynOPool at 1/2 rounds n/2 half up: the same integer
    # (from n >= 5 on, so no stage falls under the paper's 1.5 bound, which keeps 2 cells).
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1), nn.MaxPool2d(3, 2, 1))
    gm, _ = convert(model, (n_h, n_w), check=False)
    x = torch.randn(1, 3, n_h, n_w)
    with torch.no_grad():
        assert gm(x).shape == model(x).shape
