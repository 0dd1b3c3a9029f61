"""The engine in 1-D and 3-D: the dimension comes from ``input_size``, ties, cost and read-back per dimension."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import fx, nn

import dynoswap
from dynoswap import convert, count_gmacs, gmacs_loss
from dynoswap.cli.common import join_size_arguments, parse_input_size
from dynoswap.engine import ConversionError, TieError, find_resizers
from dynoswap.graph import pool_size
from dynoswap.layers import DynOPool1d, DynOPool3d, DynOPoolNd
from tests.sweep_models import owners

CONV = {1: nn.Conv1d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}
POOL = {1: nn.MaxPool1d, 3: nn.MaxPool3d}
GAP = {1: nn.AdaptiveAvgPool1d, 3: nn.AdaptiveAvgPool3d}
DYNOPOOL = {1: DynOPool1d, 3: DynOPool3d}


class Block(nn.Module):
    """A residual block whose first conv and shortcut both resize: their DynOPools must share one alpha."""

    def __init__(self, ndim: int, cin: int, cout: int, stride: int | tuple[int, ...]) -> None:
        super().__init__()
        conv, bn = CONV[ndim], BN[ndim]
        self.conv1 = conv(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(cout)
        self.relu = nn.ReLU()
        self.conv2 = conv(cout, cout, 3, padding=1, bias=False)
        self.bn2 = bn(cout)
        self.down = nn.Sequential(conv(cin, cout, 1, stride=stride, bias=False), bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.down(x))


def resnet(ndim: int, classes: int = 4) -> nn.Module:
    """Stem conv_s2 + maxpool (one merged DynOPool), then two resizing residual blocks (two tie groups)."""
    stride = 2 if ndim == 1 else (1, 2, 2)  # video: the second block halves time too
    return nn.Sequential(
        CONV[ndim](1 if ndim == 1 else 3, 8, 7 if ndim == 1 else 3, stride=2, padding=3 if ndim == 1 else 1),
        BN[ndim](8),
        nn.ReLU(),
        POOL[ndim](3, stride=2, padding=1),
        Block(ndim, 8, 16, stride),
        Block(ndim, 16, 16, 2),
        GAP[ndim](1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def vgg(ndim: int, classes: int = 4) -> nn.Module:
    """Convs at stride 1 and max pools of 2: converted, it computes exactly what it did."""
    chans = 1 if ndim == 1 else 3
    return nn.Sequential(
        CONV[ndim](chans, 8, 3, padding=1),
        nn.ReLU(),
        POOL[ndim](2),
        CONV[ndim](8, 8, 3, padding=1),
        nn.ReLU(),
        POOL[ndim](2),
        GAP[ndim](1),
        nn.Flatten(),
        nn.Linear(8, classes),
    )


SIZES = {1: (96,), 3: (8, 24, 20)}


def _input(ndim: int, batch: int = 2, size: tuple[int, ...] | None = None) -> torch.Tensor:
    return torch.randn(batch, 1 if ndim == 1 else 3, *(size or SIZES[ndim]))


def _sizes_at(gm: nn.Module, x: torch.Tensor, inputs: bool = False) -> dict[str, tuple[int, ...]]:
    """Spatial output (or input) size of each DynOPool in one forward."""
    sizes: dict[str, tuple[int, ...]] = {}

    def record(name: str, shape: torch.Size) -> None:  # a hook that returns a value would replace a tensor
        sizes.setdefault(name, tuple(shape[2:]))

    pools = [(name, m) for name, m in gm.named_modules() if isinstance(m, DynOPoolNd)]
    if inputs:
        hooks = [m.register_forward_pre_hook(lambda mod, a, name=name: record(name, a[0].shape)) for name, m in pools]
    else:
        hooks = [m.register_forward_hook(lambda mod, i, o, name=name: record(name, o.shape)) for name, m in pools]
    try:
        gm(x)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def _outputs(gm: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    return _sizes_at(gm, x)


def _inputs(gm: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    return _sizes_at(gm, x, inputs=True)


@pytest.mark.parametrize("ndim", [1, 3])
def test_each_tie_group_moves_on_its_own_on_every_axis_down_and_up(ndim: int) -> None:
    torch.manual_seed(0)
    size = SIZES[ndim]
    gm, report = convert(resnet(ndim), size)
    assert all(type(m) is DYNOPOOL[ndim] for m in gm.modules() if isinstance(m, DynOPoolNd))
    # stem (conv + merged max pool), block 1 (conv1 tied to its shortcut), block 2 (the same)
    assert [len(g) for g in report.groups] == [1, 2, 2]
    assert report.replacements[0].merged and report.replacements[0].init_scale == pytest.approx((0.25,) * ndim)
    gm.eval()
    x = _input(ndim, 1)
    reference = count_gmacs(gm, size).total
    assert gmacs_loss(gm).item() == pytest.approx(reference, rel=1e-9)
    groups = owners(gm)
    assert len(groups) == 3
    base = {name: m.alpha.detach().clone() for name, m in groups.items()}
    for leader in groups.values():
        for axis in range(ndim):
            for factor in (0.55, 1.6):  # up, then down
                with torch.no_grad():
                    for other, m in groups.items():
                        m.alpha.copy_(base[other])
                    leader.alpha[axis] *= factor
                before, after = _inputs(gm, x), _outputs(gm, x)
                at_base = _outputs_at_base(gm, x, groups, base)
                members = [n for n, m in gm.named_modules() if isinstance(m, DynOPoolNd) and m.leader is leader]
                for member in members:
                    expected = pool_size(before[member], tuple(float(a) for a in leader.alpha))
                    assert after[member] == expected
                    moved = [a for a in range(ndim) if after[member][a] != at_base[member][a]]
                    assert set(moved) <= {axis}  # only the moved axis of the moved group changes
                assert gmacs_loss(gm).item() == pytest.approx(count_gmacs(gm, size).total, rel=1e-9)
    with torch.no_grad():
        for other, m in groups.items():
            m.alpha.copy_(base[other])


def _outputs_at_base(
    gm: nn.Module, x: torch.Tensor, groups: dict[str, DynOPoolNd], base: dict[str, torch.Tensor]
) -> dict[str, tuple[int, ...]]:
    moved = {name: m.alpha.detach().clone() for name, m in groups.items()}
    with torch.no_grad():
        for name, m in groups.items():
            m.alpha.copy_(base[name])
    try:
        return _outputs(gm, x)
    finally:
        with torch.no_grad():
            for name, m in groups.items():
                m.alpha.copy_(moved[name])


@pytest.mark.parametrize("ndim", [1, 3])
def test_every_alpha_gets_a_finite_gradient_from_the_task_and_the_cost(ndim: int) -> None:
    torch.manual_seed(1)
    gm, _ = convert(resnet(ndim), SIZES[ndim])
    gm.train()
    g = torch.Generator().manual_seed(3)
    for m in owners(gm).values():
        m.set_scale(tuple((0.3 + 0.5 * torch.rand(ndim, generator=g)).tolist()))
    loss = gm(_input(ndim)).square().mean() + gmacs_loss(gm)
    loss.backward()
    assert len(owners(gm)) == 3
    for name, m in owners(gm).items():
        assert m.alpha.grad is not None and torch.isfinite(m.alpha.grad).all(), name
        assert (m.alpha.grad != 0).any(), name


@pytest.mark.parametrize("ndim", [1, 3])
def test_a_pool_only_model_computes_what_it_did(ndim: int) -> None:
    torch.manual_seed(2)
    model = vgg(ndim).eval()
    size = (64,) if ndim == 1 else (8, 16, 12)
    gm, report = convert(model, size)
    assert [r.rule for r in report.replacements] == ["pool", "pool"]
    x = _input(ndim, 2, size).requires_grad_()
    y = gm(x)
    grad = torch.autograd.grad(y.sum(), x)[0]
    x2 = x.detach().clone().requires_grad_()
    y2 = model(x2)
    assert torch.allclose(y, y2, atol=1e-6)
    assert torch.allclose(grad, torch.autograd.grad(y2.sum(), x2)[0], atol=1e-6)


def test_a_factorised_conv_is_one_dynopool_so_its_block_ties_with_the_shortcut() -> None:
    """R(2+1)D: a (1, 2, 2) spatial conv, then a (2, 1, 1) temporal one, then the block's add."""

    class Factorised(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.spatial = nn.Conv3d(3, 6, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
            self.relu = nn.ReLU()
            self.temporal = nn.Conv3d(6, 8, (3, 1, 1), stride=(2, 1, 1), padding=(1, 0, 0))
            self.down = nn.Conv3d(3, 8, 1, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.temporal(self.relu(self.spatial(x))) + self.down(x)

    gm, report = convert(Factorised(), (8, 16, 16))
    main = report.replacements[0]
    assert [m["name"] for m in main.merged] == ["temporal"]
    assert main.init_scale == pytest.approx((0.5, 0.5, 0.5))
    assert report.groups == [["spatial_dynopool", "down_dynopool"]]
    assert gm.get_submodule("spatial").stride == (1, 1, 1) and gm.get_submodule("temporal").stride == (1, 1, 1)
    assert gm(torch.randn(1, 3, 8, 16, 16)).shape == (1, 8, 4, 8, 8)


@pytest.mark.parametrize(
    ("name", "dynopools", "groups"),
    [("r3d_18", 7, 4), ("mc3_18", 7, 4), ("r2plus1d_18", 7, 4)],
)
def test_torchvision_video_resnets_convert_and_train(name: str, dynopools: int, groups: int) -> None:
    import torchvision

    torch.manual_seed(0)
    size = (4, 32, 32)
    gm, report = convert(getattr(torchvision.models.video, name)(num_classes=3), size)
    assert (report.num_dynopools, len(report.groups)) == (dynopools, groups) == (dynopools, len(owners(gm)))
    g = torch.Generator().manual_seed(0)
    for m in owners(gm).values():
        m.set_scale(tuple((0.4 + 0.6 * torch.rand(3, generator=g)).tolist()))
    gm.train()
    loss = nn.functional.cross_entropy(gm(torch.randn(2, 3, *size)), torch.tensor([0, 2])) + gmacs_loss(gm)
    loss.backward()
    assert all(torch.isfinite(m.alpha.grad).all() for m in owners(gm).values())
    assert gmacs_loss(gm).item() == pytest.approx(count_gmacs(gm, size).total, rel=1e-9)


def test_s3d_converts_and_its_whole_map_average_pool_follows_the_scales() -> None:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.video.s3d(num_classes=3).eval()
    gm, report = convert(model, (16, 224, 224))
    assert report.num_dynopools == 4  # each separable conv's (1, 2, 2) and (2, 1, 1) strides: one DynOPool
    # its 2x7x7 average pool covered the whole final map at 16x224x224: made adaptive, no limit left
    assert report.global_pools == ["avgpool"] and not report.limits
    assert isinstance(gm.get_submodule("avgpool"), nn.AdaptiveAvgPool3d)
    g = torch.Generator().manual_seed(0)
    for m in owners(gm).values():
        m.set_scale(tuple((0.4 + 0.4 * torch.rand(3, generator=g)).tolist()))
    gm.train()
    size = (4, 48, 48)  # smaller than the fixed pool's kernel allowed the original model
    # The task loss only: the GMACs loss would first record the graph with a real count at the conversion
    # size (16x224x224), gigabytes for a CPU test; the cost of 3-D models is checked on the others above.
    nn.functional.cross_entropy(gm(torch.randn(2, 3, *size)), torch.tensor([0, 2])).backward()
    assert all(torch.isfinite(m.alpha.grad).all() and (m.alpha.grad != 0).any() for m in owners(gm).values())


def test_an_average_pool_over_the_whole_map_is_made_adaptive_and_computes_the_same() -> None:
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.down = nn.MaxPool2d(2)  # a DynOPool at r = 0.5 on even sizes computes exactly this
            self.pool = nn.AvgPool2d((5, 4), stride=1)  # the whole 5x4 map at 10x8 (not a resizer: stride 1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.down(self.conv(x))).flatten(1))

    torch.manual_seed(0)
    model = Head().eval()
    gm, report = convert(model, (10, 8))
    assert report.global_pools == ["pool"]
    x = torch.randn(2, 3, 10, 8)
    assert torch.allclose(gm.eval()(x), model(x), atol=1e-6)
    gm.get_submodule("down_dynopool").set_scale((0.3, 0.7))
    assert gm(x).shape == (2, 2)


def test_a_pool_to_one_cell_before_a_linear_is_refused_in_words() -> None:
    """A resizing pool whose original output is 1x1: its DynOPool gives 2x2 and the Linear after it breaks."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d((5, 4)), nn.Flatten(), nn.Linear(4, 2))
    expected = "the converted model fails at its input size 5x4 at '3' (mat1 and mat2 shapes cannot be multiplied"
    with pytest.raises(ConversionError, match=re.escape(expected)) as info:
        convert(model, (5, 4))
    assert "1_dynopool (the original gives 1x1; a DynOPool gives at least 2 per axis)" in str(info.value)


def test_swin3d_converts_its_patch_embedding() -> None:
    import torchvision

    torch.manual_seed(0)
    size = (4, 32, 32)
    gm, report = convert(torchvision.models.video.swin3d_t(num_classes=3), size)
    assert [r.rule for r in report.replacements] == ["patchify_post"]
    pool = next(m for m in gm.modules() if isinstance(m, DynOPool3d))
    pool.set_scale((0.5, 0.3, 0.2))
    assert gm(torch.randn(1, 3, *size)).shape == (1, 3)
    assert gmacs_loss(gm).item() == pytest.approx(count_gmacs(gm, size).total, rel=1e-9)


def test_mvit_is_refused_for_its_fixed_position_embedding() -> None:
    import torchvision

    with pytest.raises(TieError, match="fixed position embedding") as info:
        convert(torchvision.models.video.mvit_v1_b(num_classes=3), (16, 224, 224))
    assert info.value.category == "fixed position embedding"


@pytest.mark.parametrize(
    ("model", "size", "message"),
    [
        (lambda: vgg(1), (32, 32), "Conv1d at 0 is 1-D but input_size has 2 sides: give input_size as (L,)"),
        (
            lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU()),
            (4, 32, 32),
            "Conv2d at 0 is 2-D but input_size has 3 sides: give input_size as (H, W)",
        ),
        (lambda: resnet(3), (64,), "Conv3d at 0 resizes 3-D but input_size has 1 side: give input_size as (T, H, W)"),
    ],
)
def test_a_size_of_another_dimension_is_refused_by_name(model, size, message) -> None:  # noqa: ANN001
    with pytest.raises(ConversionError, match=re.escape(message)) as info:
        convert(model(), size)
    assert info.value.category == "other dimension"  # type: ignore[attr-defined]


def test_a_lower_dimensional_resizer_in_a_2d_model_is_kept() -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.mix = nn.Conv1d(8, 8, 3, stride=2, padding=1)  # strided over the flattened tokens
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.mix(self.conv(x).flatten(2)).mean(-1))

    gm, report = convert(Tokens(), (16, 16))
    assert [r.name for r in report.replacements] == ["conv"]
    assert any(s.name == "mix" and "1-D resizer in a 2-D model" in s.reason for s in report.skipped)
    assert gm.get_submodule("mix").stride == (2,)
    resizers, skipped = find_resizers(fx.symbolic_trace(Tokens()), 2)
    assert [r.name for r in resizers] == ["conv"] and [s.name for s in skipped] == ["mix"]


@pytest.mark.parametrize("ndim", [1, 3])
def test_sizes_and_overrides_take_one_value_per_axis(ndim: int) -> None:
    size = SIZES[ndim]
    target = (20,) if ndim == 1 else (2, 5, 4)
    gm, _ = convert(vgg(ndim), size, sizes=[target, (6,) if ndim == 1 else (2, 3, 2)])
    assert list(_outputs(gm, _input(ndim, 1)).values())[0] == target
    with pytest.raises(ValueError, match=re.escape(f"sizes[0] must be {ndim} integers")):
        convert(vgg(ndim), size, sizes=[(5, 5), (4, 4)] if ndim == 1 else [(5, 5), (2, 2)])
    with pytest.raises(ValueError, match="init_scale must be a number or"):
        convert(vgg(ndim), size, init_scale=(0.5, 0.5))


@pytest.mark.parametrize("ndim", [1, 3])
def test_save_load_freeze_and_export_read_back(ndim: int, tmp_path) -> None:  # noqa: ANN001
    from dynoswap.export import export_model, freeze

    torch.manual_seed(4)
    size = SIZES[ndim]
    gm, _ = convert(resnet(ndim), size)
    assert len(owners(gm)) == 3
    g = torch.Generator().manual_seed(5)
    for m in owners(gm).values():
        m.set_scale(tuple((0.3 + 0.6 * torch.rand(ndim, generator=g)).tolist()))
    gm.eval()
    x = _input(ndim)
    dynoswap.save(gm, tmp_path / "m", source="tests.test_engine_nd:resnet_" + ("1d" if ndim == 1 else "3d"))
    loaded = dynoswap.load(tmp_path / "m", trust_code=True).eval()
    assert torch.equal(loaded(x), gm(x))
    assert torch.allclose(freeze(gm)(x), gm(x), atol=1e-6)
    for fmt in ("onnx", "pt2"):
        result = export_model(gm, tmp_path / f"m.{fmt}", fmt)
        assert result.input_size == size and result.max_abs_diff <= 1e-4


def resnet_1d() -> nn.Module:
    return resnet(1)


def resnet_3d() -> nn.Module:
    return resnet(3)


@pytest.mark.parametrize("ndim", [1, 3])
def test_fit_lands_a_budget_in_1d_and_3d(ndim: int) -> None:
    from torch.utils.data import DataLoader, TensorDataset

    from dynoswap.train import fit

    torch.manual_seed(6)
    size = SIZES[ndim]
    gm, _ = convert(resnet(ndim), size)
    target = 0.9 * count_gmacs(gm, size).total
    data = TensorDataset(_input(ndim, 32), torch.randint(0, 4, (32,)))
    log = fit(gm, DataLoader(data, batch_size=8), epochs=2, lam=1.0, lr=0.05, progress=False, target_gmacs=target)
    assert abs(count_gmacs(gm, size).total / target - 1) <= 0.03
    assert all(len(p["out"]) == ndim for p in log[-1]["pools"])
    assert all(torch.isfinite(m.alpha).all() for m in owners(gm).values())


def test_input_size_takes_one_two_or_three_numbers_on_the_command_line() -> None:
    assert join_size_arguments(["convert", "m", "--input-size", "8", "112", "112", "--json"]) == [
        "convert",
        "m",
        "--input-size",
        "8x112x112",
        "--json",
    ]
    assert join_size_arguments(["--input-size", "16000", "x"]) == ["--input-size", "16000", "x"]
    assert join_size_arguments(["--", "--input-size", "1", "2"]) == ["--", "--input-size", "1", "2"]
    assert parse_input_size("8x112x112") == (8, 112, 112)
    assert parse_input_size("16000") == (16000,)
    assert parse_input_size("64,48") == (64, 48)
    for bad in ("1x2x3x4", "x", "64x", "-3"):
        with pytest.raises(Exception, match="--input-size must be"):
            parse_input_size(bad)


def test_cli_converts_a_video_model(tmp_path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from dynoswap.cli.app import app

    result = CliRunner().invoke(
        app, ["convert", "torchvision:r3d_18", "--input-size", "4", "32", "32", "--num-classes", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["after"]["input_size"] == [4, 32, 32]
    bad = CliRunner().invoke(app, ["convert", "torchvision:r3d_18", "--input-size", "32", "32"])
    assert bad.exit_code != 0
    assert "give input_size as (T, H, W)" in bad.output


def test_a_1d_or_3d_model_without_an_input_size_is_asked_for_one() -> None:
    from typer.testing import CliRunner

    from dynoswap.cli.app import app

    for command in ("inspect", "convert"):
        result = CliRunner().invoke(app, [command, "m5"])
        assert result.exit_code == 2, result.output
        assert "m5 is a 1-D model: give --input-size L" in result.output
    result = CliRunner().invoke(app, ["inspect", "video-tiny", "--input-size", "8", "16", "16", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stages"] == [[8, 16, 16], [4, 8, 8], [2, 4, 4], [1, 2, 2]]


@pytest.mark.parametrize(
    ("model", "data", "size", "sizes"),
    [
        ("m5", "pulses", ["1024"], 4),  # M5's stride-4 conv and its three pools: four groups
        ("video-tiny", "moving-bars", ["8", "16", "16"], 3),
    ],
)
def test_train_runs_on_the_built_in_1d_and_video_sets(model, data, size, sizes, tmp_path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from dynoswap.cli.app import app
    from dynoswap.train import read_log

    out = tmp_path / "run"
    args = ["train", model, "--data", data, "--input-size", *size, "--epochs", "1", "--max-steps", "2"]
    args += ["--batch-size", "8", "--model-kwargs", "width=0.25", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = read_log(out)[-1]
    assert len(record["pools"]) == sizes and all(len(p["out"]) == len(size) for p in record["pools"])
    loaded = dynoswap.load(out)
    x = torch.randn(2, 1 if len(size) == 1 else 3, *map(int, size))
    assert loaded(x).shape == (2, 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "groups"),
    [
        ("m5", {"width": 0.25}, (2048,), 4),
        ("resnet1d", {"width": 0.25}, (256,), 4),  # stem (conv + max pool), three stages tied to their shortcuts
        ("video-tiny", {"width": 0.5}, (8, 16, 16), 3),
    ],
)
def test_the_zoo_1d_and_video_models_convert_move_and_read_back(name, kwargs, size, groups, tmp_path) -> None:  # noqa: ANN001
    from dynoswap.models import ModelSource

    torch.manual_seed(0)
    src = ModelSource("dynoswap", name, {"num_classes": 3, **kwargs})
    gm, report = convert(src.build(), size, source=src)
    assert len(report.groups) == len(owners(gm)) == groups
    g = torch.Generator().manual_seed(1)
    for m in owners(gm).values():
        m.set_scale(tuple((0.3 + 0.6 * torch.rand(len(size), generator=g)).tolist()))
    x = torch.randn(2, 1 if len(size) == 1 else 3, *size)
    gm.train()
    (gm(x).square().mean() + gmacs_loss(gm)).backward()
    assert all(torch.isfinite(m.alpha.grad).all() and (m.alpha.grad != 0).any() for m in owners(gm).values())
    assert gmacs_loss(gm).item() == pytest.approx(count_gmacs(gm, size).total, rel=1e-9)
    gm.eval()
    dynoswap.save(gm, tmp_path / "m")
    assert torch.equal(dynoswap.load(tmp_path / "m").eval()(x), gm(x))
