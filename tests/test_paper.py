"""The paper's networks (supplement 1.1) and its Table 1 / Table 4 GMACs recomputed at the printed sizes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dynoswap import zoo
from dynoswap.cli.app import app
from dynoswap.cost import stage_sizes
from dynoswap.engine import convert
from dynoswap.errors import ModelError
from dynoswap.zoo.paper_tables import TOLERANCE, compute_rows, dynopool_shares, paper_rows

runner = CliRunner()

# Table 1's human column at 32x32 and the number of tie groups (one alpha each) of the converted network.
CIFAR = {
    "paper:vgg16-cifar": ([(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)], 4),
    "paper:resnet50-cifar": ([(32, 32), (16, 16), (8, 8), (4, 4)], 3),
    "paper:mobilenet_v2-cifar": ([(32, 32), (16, 16), (8, 8), (4, 4)], 3),
}


@pytest.mark.parametrize("name", sorted(CIFAR))
def test_cifar_networks_have_table1_human_stages(name):
    stages, groups = CIFAR[name]
    model = zoo.build(name, {"num_classes": 100})
    assert stage_sizes(model, (32, 32)) == stages
    gm, report = convert(model, (32, 32))
    assert len(report.groups) == groups
    assert stage_sizes(gm, (32, 32)) == stages
    assert gm(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


def test_paper_networks_are_listed_and_take_num_classes():
    result = runner.invoke(app, ["list", "paper*"])
    assert result.exit_code == 0, result.output
    names = result.output.split()
    for name in (*CIFAR, "paper:vgg16", "paper:resnet50", "paper:mobilenet_v2", "paper:hrnet_w48-seg"):
        assert name in names
    with pytest.raises(ModelError, match="does not take"):
        zoo.build("paper:vgg16", {"weights": "IMAGENET1K_V1"})


def test_vgg16_has_one_fc_and_four_pools():
    model = zoo.build("paper:vgg16", {"num_classes": 7})
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    pools = [m for m in model.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 7)]
    assert len(pools) == 4


@pytest.mark.parametrize(
    ("name", "tv_name", "changed"),
    [
        ("paper:vgg16", "vgg16_bn", {"classifier"}),
        ("paper:resnet50", "resnet50", set()),
        ("paper:mobilenet_v2", "mobilenet_v2", set()),
        ("paper:resnet50-cifar", "resnet50", {"conv1"}),
        ("paper:mobilenet_v2-cifar", "mobilenet_v2", {"features.0.0"}),
    ],
)
def test_torchvision_checkpoints_patch_in(name, tv_name, changed):
    import torchvision

    torch.manual_seed(0)
    reference = getattr(torchvision.models, tv_name)(num_classes=10).state_dict()
    model = zoo.build(name, {"num_classes": 10})
    ours = model.state_dict()

    def prefix(key: str) -> str:
        return next((p for p in changed if key.startswith(p + ".")), "")

    shared = {k: v for k, v in reference.items() if k in ours and ours[k].shape == v.shape}
    different = set(reference) - set(shared)
    assert {prefix(k) for k in different} <= changed and "" not in {prefix(k) for k in different}
    assert {prefix(k) for k in set(ours) - set(shared)} <= changed
    missing, _ = model.load_state_dict(shared, strict=False)
    assert all(prefix(k) for k in missing)  # only the changed head/stem keeps its own weights
    for key, value in shared.items():
        assert torch.equal(model.state_dict()[key], value)


def test_preset_first_init_scale_lands_on_layer2_of_resnet50_cifar():
    from dynoswap.cli.convert import make_plan, run_conversion
    from dynoswap.layers import DynOPool2d
    from dynoswap.presets import load_preset

    preset = load_preset("resnet50-cifar100-s")
    model = zoo.build(preset.backbone, {"num_classes": 100})
    plan = make_plan(preset, None, None, None, None, None, None)
    gm, report = run_conversion(model, plan, None)
    leaders = {id(m.leader): m for m in gm.modules() if isinstance(m, DynOPool2d)}
    scales = [tuple(round(v, 6) for v in m.scale) for m in leaders.values()]
    assert sorted(scales) == [(0.5, 0.5), (0.5, 0.5), (0.6, 0.6)]
    first = report.to_dict()["replacements"][0]
    assert first["name"].startswith("layer2.0") and first["init_scale"] == pytest.approx([0.6, 0.6])
    assert stage_sizes(gm, (32, 32)) == [(32, 32), (19, 19), (10, 10), (5, 5)]


def _check_rows(results):
    assert results
    for res in results:
        r = res.row
        if res.status != "ok":
            assert res.reason, f"{r.backbone} {r.dataset} {r.model}: {res.difference:+.1%} with no reason"
        else:
            assert abs(res.difference) <= TOLERANCE
        if r.human and r.table == "1":
            assert res.stage_sizes == list(r.printed_sizes)
        elif not r.human:
            assert res.stage_sizes[-len(r.dynopool_sizes) :] == r.dynopool_sizes


def test_table1_cifar_rows_within_two_percent():
    results = compute_rows(paper_rows(("1",), ["CIFAR-100"]))
    _check_rows(results)
    by = {(r.row.backbone, r.row.model): r for r in results}
    for backbone in ("VGG-16", "ResNet-50"):
        for model in ("Human", "DynOPool-S", "DynOPool-B"):
            assert abs(by[backbone, model].difference) <= TOLERANCE
    assert by["ResNet-50", "Human"].gmacs == pytest.approx(1.3049, abs=1e-3)
    assert by["VGG-16", "DynOPool-B"].gmacs == pytest.approx(1.6986, abs=1e-3)
    # MobileNetV2 CIFAR DynOPool-S: 0.0751 prints as 0.08.
    assert by["MobileNetV2", "DynOPool-S"].status == "rounding"
    shares = {s.backbone: s for s in dynopool_shares(results)}
    assert shares["MobileNetV2"].percent_by_model["Human"] == pytest.approx(0.99, abs=0.01)


def test_table1_cli_json_cifar():
    result = runner.invoke(app, ["paper", "table1", "--dataset", "cifar100", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["rows"]) == 9 and len(data["supplement_table3"]) == 3
    assert all(row["status"] == "ok" or row["reason"] for row in data["rows"])
    assert "16 MACs per output element" in data["share_convention"]


def test_table1_cli_rejects_unknown_dataset():
    result = runner.invoke(app, ["paper", "table1", "--dataset", "mnist"])
    assert result.exit_code == 2
    assert "not a data set of the paper" in result.output


@pytest.mark.slow
def test_table1_every_row_at_224():
    results = compute_rows(paper_rows(("1",), ["FGVC-Aircraft", "ImageNet"]))
    _check_rows(results)
    by = {(r.row.backbone, r.row.dataset, r.row.model): r for r in results}
    assert by["VGG-16", "ImageNet", "DynOPool-S"].gmacs == pytest.approx(10.12, abs=0.01)
    assert by["ResNet-50", "ImageNet", "DynOPool-B"].gmacs == pytest.approx(12.76, abs=0.01)
    off = {k for k, r in by.items() if r.status != "ok"}
    assert off == {
        ("MobileNetV2", "FGVC-Aircraft", "Human"),
        ("MobileNetV2", "ImageNet", "DynOPool-S"),
        ("MobileNetV2", "ImageNet", "DynOPool-B"),
    }


@pytest.mark.slow
def test_table4_hrnet_w48():
    results = compute_rows(paper_rows(("4",)))
    _check_rows(results)
    assert [round(r.gmacs, 1) for r in results] == [82.5, 69.4]
