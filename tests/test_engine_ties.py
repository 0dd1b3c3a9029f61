"""Tying discovered by moving every group's scale on its own; refusals by category; what convert keeps."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynoswap
from dynoswap import convert, count_gmacs, gmacs_loss
from dynoswap.cost.count import FUNCTIONAL
from dynoswap.engine import ConversionError, TieError
from tests.sweep_models import move_independently, owners


def train_step(gm: nn.Module, x: torch.Tensor, output: Callable = lambda o: o) -> None:
    """Forward + backward; every alpha gets a finite, non-zero gradient."""
    gm.train()
    gm.zero_grad()
    (output(gm(x)).float() ** 2).mean().backward()
    for name, m in owners(gm).items():
        grad = m.alpha.grad
        assert grad is not None and torch.isfinite(grad).all() and (grad != 0).any(), (name, grad)


# -- one hand-written model per combining op: exactly the groups that must be tied -------------
def _gate(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return p * torch.sigmoid(q.mean((2, 3), keepdim=True))  # SE/ECA: a [N, C, 1, 1] gate ties nothing


def _bmm(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    attn = torch.bmm(p.flatten(2), q.flatten(2).transpose(1, 2))  # [N, C, C]: needs equal H*W
    return p * attn.sum(-1)[..., None, None]


COMBINE: dict[str, tuple[Callable, int, bool]] = {
    # name: (combine(p, q), channels of the result, whether a and b must be tied)
    "add": (lambda p, q: p + q, 4, True),
    "mul": (lambda p, q: p * q, 4, True),
    "cat": (lambda p, q: torch.cat([p, q], 1), 8, True),
    "stack": (lambda p, q: torch.stack([p, q]).sum(0), 4, True),
    "where": (lambda p, q: torch.where(p > 0, p, q), 4, True),
    "einsum": (lambda p, q: torch.einsum("nchw,nchw->nchw", p, q), 4, True),
    "bmm": (_bmm, 4, True),
    "broadcast gate": (_gate, 4, False),
}


class Combined(nn.Module):
    """Two strided branches from one input, combined; then a third, independent stage."""

    def __init__(self, combine: Callable, channels: int) -> None:
        super().__init__()
        self.combine = combine
        self.a = nn.Conv2d(3, 4, 3, 2, 1)
        self.b = nn.Conv2d(3, 4, 3, 2, 1)
        self.c = nn.Conv2d(channels, 4, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.combine(self.a(x), self.b(x)))


@pytest.mark.parametrize("op", list(COMBINE))
def test_each_combining_op_ties_exactly_what_it_must(op: str) -> None:
    combine, channels, tied = COMBINE[op]
    gm, report = convert(Combined(combine, channels), (32, 24))
    expected = (
        [["a_dynopool", "b_dynopool"], ["c_dynopool"]] if tied else [["a_dynopool"], ["b_dynopool"], ["c_dynopool"]]
    )
    assert report.groups == expected
    x = torch.randn(2, 3, 32, 24)
    for seed in range(3):
        move_independently(gm, seed, 0.3, 1.6)  # down and up
        train_step(gm, x)


def test_a_missing_tie_is_found_only_by_moving_groups_apart() -> None:
    # Two branches with different strides that meet again: equal at init, never tieable.
    class Apart(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, 2, 1)
            self.b1 = nn.Conv2d(3, 4, 3, 2, 1)
            self.b2 = nn.Conv2d(4, 4, 3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.stack([self.a(x), self.b2(F.max_pool2d(self.b1(x), 3, 1, 1))]).sum(0)

    gm, report = convert(Apart(), (16, 16))
    assert report.groups == [["a_dynopool", "b1_dynopool"]]


# -- the named timm models -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["skresnet18", "ecaresnet50t", "hgnetv2_b0"])
def test_timm_models_that_broke_convert_and_train_with_groups_moved_apart(name: str) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    gm, report = convert(model, (64, 64))
    x = torch.randn(2, 3, 64, 64)
    for seed in range(2):
        move_independently(gm, seed)
        train_step(gm, x)
        assert gmacs_loss(gm).item() == pytest.approx(count_gmacs(gm, 64).total, rel=1e-9)


def test_ecaresnet_gate_and_hgnet_same_size_pool_tie_nothing_extra() -> None:
    import timm

    gm, report = convert(timm.create_model("ecaresnet50t", num_classes=10), (64, 64))
    # Stem, then one group per stage: a block's conv and its shortcut meet at the residual add.
    assert report.num_alphas == 5 and not any("se" in n for g in report.groups for n in g if len(g) > 1)


# -- MTCNN-shaped toys: PReLU, ceil_mode pools, a flatten into Linear --------------------------
class PNet(nn.Module):
    """Fully convolutional, like MTCNN's PNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1, self.conv4_2 = nn.Conv2d(32, 2, 1), nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), torch.softmax(self.conv4_1(x), dim=1)


class RNet(nn.Module):
    """MTCNN's RNet shape: ceil_mode pools, then an NHWC flatten into Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5 = nn.Linear(128, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        return self.dense5(self.prelu4(self.dense4(x.view(x.shape[0], -1))))


def test_pnet_exact_at_init_on_even_sizes_and_same_geometry_at_odd_sizes() -> None:
    torch.manual_seed(0)
    model = PNet().eval()
    gm, report = convert(model, (122, 162))
    x = torch.randn(2, 3, 122, 162)
    with torch.no_grad():
        for got, ref in zip(gm.eval()(x), model(x), strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    # At 121x161 the ceil_mode pool gives 60x80 from 119x159: round half up of n/2 is ceil(n/2), so the
    # default scale 1/2 already reproduces it (no note), and the stages equal the original's.
    gm, report = convert(model, (121, 161))
    x = torch.randn(2, 3, 121, 161)
    with torch.no_grad():
        shapes = [tuple(t.shape) for t in gm.eval()(x)]
        assert shapes == [tuple(t.shape) for t in model(x)]
    row = report.replacements[0]
    assert row.was["ceil_mode"] is True and row.original_out == (60, 80) and row.note == ""
    assert row.init_scale == (0.5, 0.5)


def test_rnet_head_refused_with_the_reason_and_adapted_on_request() -> None:
    torch.manual_seed(0)
    with pytest.raises(TieError, match=r"'dense4' flattens a 3×3 map .* into Linear\(576 → 128\)") as info:
        convert(RNet(), (24, 24))
    assert info.value.category == "fixed-size head" and "head='adapt'" in str(info.value)
    model = RNet().eval()
    gm, report = convert(model, (24, 24), head="adapt")
    assert report.adapted_heads == ["dense4"]
    assert gm.meta["dynoswap"]["options"]["head"] == "adapt"
    x = torch.randn(4, 3, 24, 24)
    with torch.no_grad():  # geometry at init: ceil_mode pools give 11 and 4, as the original
        assert gm.eval()(x).shape == model(x).shape
        assert [r.original_out for r in report.replacements] == [(11, 11), (4, 4)]
    # MaxPool2d(3, 2, ceil_mode=True) on 9x9 gives 4x4 where round(9/2) = 5: alpha = 9/4 reproduces it.
    row = report.replacements[1]
    assert row.note == "ceil_mode: init alpha 2.25 (original output 4x4)"
    assert row.init_scale == pytest.approx((4 / 9, 4 / 9))
    assert "MaxPool2d 3x3/2 ceil" in str(report.table().columns[1]._cells)
    for seed in range(3):
        move_independently(gm, seed, 0.4, 1.5)
        train_step(gm, x)


# -- refusals -------------------------------------------------------------------------------
def test_3d_model_with_a_2d_size_and_converted_model_are_refused_by_name() -> None:
    import torchvision

    expected = re.escape("Conv3d at stem.0 resizes 3-D but input_size has 2 sides: give input_size as (T, H, W)")
    with pytest.raises(ConversionError, match=expected) as info:
        convert(torchvision.models.video.r3d_18(), (32, 32))
    assert info.value.category == "other dimension"
    gm, _ = convert(Combined(COMBINE["add"][0], 4), (16, 16))
    with pytest.raises(ConversionError, match="already converted") as info:
        convert(gm, (16, 16))
    assert info.value.category == "already converted"


def test_a_conv3d_that_does_not_resize_does_not_block_a_2d_conversion() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("lambda_resnet26t", pretrained=False, num_classes=10)
    positional = [n for n, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    assert positional  # each lambda layer's positional conv, at stride 1
    gm, report = convert(model, (64, 64))
    assert all(isinstance(gm.get_submodule(n), nn.Conv3d) for n in positional)
    assert not any(r.name in positional for r in report.replacements)
    x = torch.randn(2, 3, 64, 64)
    # The positional Conv3d runs on (N, 1, H, W, V): its cost follows (H, W) in the loss. The lambda's
    # matmuls are functional ops of the traced graph, which the loss holds at their reference count.
    reference = count_gmacs(gm, 64)
    functional_ref = reference.by_layer[FUNCTIONAL]
    assert gmacs_loss(gm).item() == pytest.approx(reference.total, rel=1e-9)  # the loss is recorded here
    for seed in range(2):
        move_independently(gm, seed)
        train_step(gm, x)
        count = count_gmacs(gm, 64)
        assert count.by_layer[FUNCTIONAL] != functional_ref  # the scales did move the lambdas
        expected = count.total - count.by_layer[FUNCTIONAL]
        assert gmacs_loss(gm).item() - functional_ref == pytest.approx(expected, rel=1e-9)


def test_a_model_of_only_stride_1_conv3d_is_refused_with_a_2d_size() -> None:
    expected = re.escape("Conv3d at 0 is 3-D but input_size has 2 sides: give input_size as (T, H, W)")
    with pytest.raises(ConversionError, match=expected) as info:
        convert(nn.Sequential(nn.Conv3d(3, 4, 3, padding=1), nn.ReLU()), (16, 16))
    assert info.value.category == "other dimension"


# -- what convert keeps ------------------------------------------------------------------------
def test_module_flags_requires_grad_and_dtype_are_kept() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, 2, 1)
            self.bn = nn.BatchNorm2d(4)
            self.head = nn.Conv2d(4, 4, 3, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.bn(self.conv(x))))

    model = Net().double().train()
    model.bn.eval()  # a frozen BN
    model.conv.weight.requires_grad_(False)
    gm, _ = convert(model, (16, 16))
    assert gm.training and not gm.get_submodule("bn").training and gm.get_submodule("head").training
    assert not gm.get_submodule("conv").weight.requires_grad and gm.get_submodule("head").weight.requires_grad
    assert all(m.alpha.dtype == torch.float64 for m in owners(gm).values())
    assert model.training and not model.bn.training  # the caller's model is untouched
    out = gm(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_meta_model_converts_with_alphas_on_meta() -> None:
    with torch.device("meta"):
        model = Combined(COMBINE["cat"][0], 8)
    gm, report = convert(model, (32, 32))
    assert report.groups == [["a_dynopool", "b_dynopool"], ["c_dynopool"]]
    assert all(m.alpha.is_meta for m in owners(gm).values())


# -- both modes: auxiliary heads ----------------------------------------------------------------
def _first(out: object) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "size"), [("googlenet", 64), pytest.param("inception_v3", 299, marks=pytest.mark.slow)]
)
def test_aux_heads_convert_save_and_load_in_both_modes(tmp_path, name: str, size: int) -> None:
    import torchvision

    from dynoswap.models import ModelSource

    kwargs = {"num_classes": 10, "init_weights": False}  # torchvision's default init is slow (scipy)
    model = torchvision.models.get_model(name, **kwargs).eval()  # the mode at conversion does not matter
    gm, report = convert(model, (size, size), source=ModelSource("torchvision", name, kwargs))
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in gm.parameters()) == before + 2 * report.num_alphas
    move_independently(gm, 0, 0.4, 0.7)
    dynoswap.save(gm, tmp_path / "m")
    loaded = dynoswap.load(tmp_path / "m")
    x = torch.randn(2, 3, size, size)
    for mode in ("train", "eval"):
        for m in (gm, loaded):
            getattr(m, mode)()
        torch.manual_seed(1)
        a = gm(x)
        torch.manual_seed(1)
        b = loaded(x)
        assert type(a) is type(b)
        assert torch.equal(_first(a), _first(b)), mode
    assert isinstance(gm.eval()(x), torch.Tensor) and not isinstance(gm.train()(x), torch.Tensor)
    assert gmacs_loss(gm).item() == pytest.approx(count_gmacs(gm, size).total, rel=1e-9)
    copied = copy.deepcopy(gm).eval()
    assert torch.equal(copied(x), gm.eval()(x))
