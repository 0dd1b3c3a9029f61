"""timm families that needed their own rule or fix: each converts (random init, small input) or is refused precisely.

Per converting family: it converts, moving each tie group's scale on its own changes the output, and
``gmacs_loss == count_gmacs`` at moved scales. Per refusal: its category, and the message names the op.
"""

from __future__ import annotations

import copy
import math
import operator

import pytest
import torch
from torch import nn

import dynoswap
from dynoswap import convert, count_gmacs, gmacs_loss
from dynoswap.engine import ConversionError
from dynoswap.engine.trace import default_args, trace
from dynoswap.layers import DynOPool2d
from tests.sweep_models import move_independently, owners

timm = pytest.importorskip("timm")
from timm.layers import BlurPool2d  # noqa: E402


def each_group_moves_the_output(gm: nn.Module, size: int) -> None:
    """Move one tie group at a time: the output changes every time; the loss stays the count."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, size, size)
    gm.eval()
    with torch.no_grad():
        base = gm(x)
        for name, m in owners(gm).items():
            before = m.scale
            m.set_scale((0.7, 0.65))
            assert not torch.equal(gm(x), base), f"moving {name}'s group left the output unchanged"
            m.set_scale(before)
    move_independently(gm, 0)
    assert math.isclose(gmacs_loss(gm).item(), count_gmacs(gm, size).total, rel_tol=1e-9)


# -- anti-aliased blur pools: conv_post (stride-1 blur, then a mean DynOPool) --------------------
class Blurred(nn.Module):
    """conv -> BlurPool2d(stride 2) -> conv -> BlurPool2d(even filter, constant padding) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.blur1 = BlurPool2d(4, filt_size=3, stride=2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.blur2 = BlurPool2d(4, filt_size=4, stride=2, pad_mode="constant")
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blur2(torch.relu(self.conv2(self.blur1(torch.relu(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("size", [32, 31])
def test_blur_pool_runs_at_stride_one_then_mean_dynopool(size: int) -> None:
    model = Blurred()
    gm, report = convert(model, (size, size))
    assert [(r.name, r.was["op"], r.rule) for r in report.replacements] == [
        ("blur1", "BlurPool2d", "conv_post"),
        ("blur2", "BlurPool2d", "conv_post"),
    ]
    blurs = [m for m in gm.modules() if isinstance(m, BlurPool2d)]
    assert len(blurs) == 2 and all(b.stride == 1 for b in blurs)
    assert blurs[1].padding == [1, 2, 1, 2]  # a 4-tap filter: size-preserving, more after (as padding='same')
    pools = [m for m in gm.modules() if isinstance(m, DynOPool2d)]
    assert [p.aggregate for p in pools] == ["mean", "mean"]
    # At the default scales every map keeps the original's size.
    x = torch.randn(1, 3, size, size)
    gm(x)
    want = []
    h = size
    for blur in (model.blur1, model.blur2):
        h = blur(torch.zeros(1, 4, h, h)).shape[-1]
        want.append((h, h))
    assert [p.last_out_size for p in pools] == want
    each_group_moves_the_output(gm, size)


def test_blur_pool_before_the_conv_with_placement_pre() -> None:
    gm, report = convert(Blurred(), (32, 32), placement="pre")
    assert {r.rule for r in report.replacements} == {"conv_pre"}
    assert all(b.stride == 1 for b in gm.modules() if isinstance(b, BlurPool2d))
    each_group_moves_the_output(gm, 32)


def test_resnetblur_keeps_no_fixed_stride_two_blur() -> None:
    gm, report = convert(timm.create_model("resnetblur18", num_classes=10), (64, 64))
    blurred = [r.name for r in report.replacements if r.was["op"] == "BlurPool2d"]
    assert blurred == ["maxpool.1", "layer2.0.aa", "layer3.0.aa", "layer4.0.aa"]
    assert {b.stride for b in gm.modules() if isinstance(b, BlurPool2d)} == {1}
    assert report.num_alphas == 5
    each_group_moves_the_output(gm, 64)
    frozen = dynoswap.freeze(gm.eval(), (64, 64))  # at the moved scales: interpolate + pool, the blur kept
    assert not any(isinstance(m, DynOPool2d) for m in frozen.modules())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(frozen(x), gm(x))


# -- optional forward arguments: traced as None ---------------------------------------------------
class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        if mask is not None or causal:  # timm's ViT forward: untraceable with placeholders
            x = x * mask.view(x.shape[0], 1, *x.shape[-2:])
        return self.conv(x).mean((2, 3))


def test_optional_arguments_are_traced_with_their_defaults() -> None:
    assert default_args(Masked()) == {"mask": None, "causal": False}
    gm = trace(Masked())
    assert not any(n.op == "call_method" and n.target == "view" for n in gm.graph.nodes)
    converted, _ = convert(Masked(), (16, 16))
    x = torch.randn(2, 3, 16, 16)
    assert converted(x).shape == (2, 4)


def test_hiera_is_refused_for_its_fixed_position_embedding() -> None:
    model = timm.create_model("hiera_tiny_224", num_classes=10)
    with pytest.raises(ConversionError) as info:
        convert(model, (224, 224))
    assert info.value.category == "fixed position embedding"
    assert "'pos_embed' of fixed shape (1, 3136, 96)" in str(info.value)


# -- a learned upsampling cropped back to the block's input size (LowFormer) ----------------------
class CroppedAttention(nn.Module):
    """Pool inside the block (strided depthwise conv), upsample back (ConvTranspose2d), crop, add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 2, 1)
        self.down = nn.Conv2d(4, 4, 3, 2, 1, groups=4)
        self.up = nn.ConvTranspose2d(4, 4, 4, 2, 1, groups=4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        h, w = x.shape[-2:]
        x = x + self.up(torch.relu(self.down(x)))[..., :h, :w]
        return self.head(x.mean((2, 3)))


def test_cropped_learned_upsampling_is_resized_to_the_crop() -> None:
    gm, report = convert(CroppedAttention(), (32, 32))
    assert report.resized_to_partner == ["getitem_3"]
    assert report.num_alphas == 2
    resized = [n for n in gm.graph.nodes if n.target is torch.nn.functional.interpolate]
    assert len(resized) == 1 and resized[0].kwargs["mode"] == "bilinear"
    # The identity at the conversion's scales: the same outputs with the resize taken out.
    without = copy.deepcopy(gm)
    node = next(n for n in without.graph.nodes if n.target is torch.nn.functional.interpolate)
    node.replace_all_uses_with(node.args[0])
    without.graph.erase_node(node)
    without.recompile()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gm(x), without(x))
        owners(gm)["down_dynopool"].set_scale((0.3, 0.3))  # 16 -> 5, upsampled to 10, resized to 16
        owners(without)["down_dynopool"].set_scale((0.3, 0.3))
        assert gm(x).shape == (1, 2)
        with pytest.raises(RuntimeError):  # what the crop alone gives: 10 rows against 16
            without(x)
        owners(gm)["down_dynopool"].set_scale((0.5, 0.5))
    each_group_moves_the_output(gm, 32)


def test_lowformer_converts_with_its_attention_resolutions_learned() -> None:
    gm, report = convert(timm.create_model("lowformer_b0", num_classes=10), (96, 96))
    assert report.num_alphas == 8
    crops = [name.rsplit(".", 1) for name in report.resized_to_partner]  # scope, node name
    assert [scope for scope, _ in crops] == [f"stages.2.{i}.attn.main.1" for i in (1, 2, 3)]
    assert all(node.startswith("getitem") for _, node in crops)
    each_group_moves_the_output(gm, 96)


# -- precise refusals ------------------------------------------------------------------------------
def test_sam2_hiera_window_embedding_tiled_is_a_fixed_position_embedding() -> None:
    with pytest.raises(ConversionError) as info:
        convert(timm.create_model("sam2_hiera_tiny", num_classes=10), (64, 64))
    assert info.value.category == "fixed position embedding"
    assert "('tile' repeats 'pos_embed_window' of fixed shape (1, 96, 8, 8) to a map's size" in str(info.value)


def test_coatnet_relative_position_bias_is_a_fixed_position_embedding() -> None:
    with pytest.raises(ConversionError) as info:
        convert(timm.create_model("test_coatnet", num_classes=10), (160, 160))
    assert info.value.category == "fixed position embedding"
    message = str(info.value)
    assert "'stages.2.blocks.0.attn.scaled_dot_product_attention' combines" in message
    assert "of fixed shape (1, 2, 100, 100)" in message


# -- a size computed from a resizer's input as side // stride (Twins' patch embedding) -------------
class PatchGrid(nn.Module):
    """A patch embedding that returns its grid as (H // p, W // p); tokens reshaped to that grid after."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 4, 4, 4)
        self.mix = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, h, w = x.shape
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        grid = tokens.transpose(1, 2).reshape(x.shape[0], 4, h // 4, w // 4)
        return self.head(self.mix(grid).mean((2, 3)))


def test_size_computed_as_input_over_stride_follows_the_dynopool() -> None:
    gm, report = convert(PatchGrid(), (32, 32))
    assert report.num_alphas == 1
    assert not any(n.target is operator.floordiv for n in gm.graph.nodes)
    reads = [n for n in gm.graph.nodes if n.target is getattr and n.args[0].target == "proj_dynopool"]
    assert len(reads) == 2  # one per axis
    owners(gm)["proj_dynopool"].set_scale((0.1, 0.3))  # 3 x 10 tokens, not 8 x 8
    assert gm(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    each_group_moves_the_output(gm, 32)


def test_twins_converts_its_patch_embeddings_and_subsampled_attention() -> None:
    gm, report = convert(timm.create_model("twins_svt_small", num_classes=10), (64, 64))
    assert report.num_alphas == 11
    assert [r.name for r in report.replacements if r.name.startswith("patch_embeds")] == [
        f"patch_embeds.{i}.proj" for i in range(4)
    ]
    each_group_moves_the_output(gm, 64)


# -- ViTs whose forward takes (x, attn_mask=None, is_causal=False) ----------------------------------
@pytest.mark.slow
def test_dinov3_vit_converts_with_its_rope_following_the_map() -> None:
    gm, report = convert(timm.create_model("vit_tiny_patch16_dinov3_qkvb", num_classes=10), (64, 64))
    assert [(r.name, r.rule) for r in report.replacements] == [("patch_embed.proj", "patchify_post")]
    each_group_moves_the_output(gm, 64)


def test_vit_with_a_fixed_input_size_traces_and_is_refused_for_it() -> None:
    with pytest.raises(ConversionError) as info:
        convert(timm.create_model("test_vit", num_classes=10), (160, 160))
    assert info.value.category == "fixed input size"
    assert "at 'patch_embed._assert" in str(info.value)


# -- stems that change the input's channels before the first conv ---------------------------------
def test_tresnet_space_to_depth_stem_takes_three_channels() -> None:
    from dynoswap.cost.count import infer_in_chans

    gm, report = convert(timm.create_model("tresnet_m", num_classes=10), (64, 64))
    assert infer_in_chans(gm) == 3  # its first conv takes 48: the space-to-depth stem's 4 x 4 x 3
    assert [r.was["op"] for r in report.replacements].count("BlurPool2d") == 3
    assert {b.stride for b in gm.modules() if isinstance(b, BlurPool2d)} == {1}
    each_group_moves_the_output(gm, 64)


@pytest.mark.slow
def test_csatv2_dct_stem_takes_three_channels() -> None:
    from dynoswap.cost.count import infer_in_chans

    gm, report = convert(timm.create_model("csatv2", num_classes=10), (128, 128))
    assert infer_in_chans(gm) == 3  # its first conv takes 64: the DCT stem's coefficients
    assert report.num_alphas == 3
    each_group_moves_the_output(gm, 128)  # at 64 the last stages sit at the 2-pixel minimum
