"""Converting one part of a model: convert(..., submodule=...), its recipe, save/load, freeze."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import fx, nn

import dynoswap
from dynoswap.engine import TieError, TraceError, convert
from dynoswap.engine.submodule import part_candidates
from dynoswap.errors import OptionError, RecipeError
from dynoswap.io.recipe import RECIPE_KEY, Recipe, recipe_of
from dynoswap.layers import DynOPool2d
from dynoswap.sources import ModelSource, build_model

SOURCE = ModelSource(
    "torchvision", "fasterrcnn_mobilenet_v3_large_fpn", {"num_classes": 3, "min_size": 128, "max_size": 128}
)


@pytest.fixture(scope="module")
def detector() -> nn.Module:
    torch.manual_seed(0)
    return build_model(SOURCE.library, SOURCE.name, SOURCE.kwargs).eval()


@pytest.fixture(scope="module")
def converted(detector: nn.Module) -> tuple[nn.Module, dynoswap.ConversionReport]:
    return convert(detector, (128, 128), submodule="backbone", source=SOURCE)


def _images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(3, 128, 128, generator=gen)]


def test_the_part_is_converted_in_a_copy_and_the_whole_model_returned(detector, converted) -> None:
    whole, report = converted
    assert type(whole) is type(detector)
    assert isinstance(whole.backbone, fx.GraphModule)
    assert not isinstance(detector.backbone, fx.GraphModule)  # the caller's model is untouched
    assert not any(isinstance(m, DynOPool2d) for m in detector.modules())
    pools = [n for n, m in whole.named_modules() if isinstance(m, DynOPool2d)]
    assert pools and all(n.startswith("backbone.") for n in pools)
    assert len(pools) == report.num_dynopools == 6
    assert report.submodule == "backbone"
    assert report.model == "torchvision:fasterrcnn_mobilenet_v3_large_fpn"
    assert report.to_dict()["submodule"] == "backbone"
    assert str(report).startswith("ConversionReport(torchvision:fasterrcnn_mobilenet_v3_large_fpn backbone:")
    assert report.table().title.startswith(
        "torchvision:fasterrcnn_mobilenet_v3_large_fpn backbone (128x128 input): 6 DynOPool"
    )


def test_the_whole_model_carries_the_recipe_with_the_part(converted) -> None:
    whole, report = converted
    recipe = recipe_of(whole)
    assert recipe.options.submodule == "backbone"
    assert recipe.options.anchors == "float"
    assert recipe.source == SOURCE
    assert recipe.input_size == (128, 128)
    assert recipe.groups == report.groups
    # The part keeps its own recipe (no source: it is not saved alone).
    assert recipe_of(whole.backbone).options.submodule is None


def test_costs_of_the_whole_model_are_its_parts(converted) -> None:
    from dynoswap.cost import alphas, gmacs_loss, stage_sizes

    whole, _ = converted
    assert torch.equal(gmacs_loss(whole), gmacs_loss(whole.backbone))
    assert alphas(whole) == alphas(whole.backbone) and len(alphas(whole)) == 6
    assert stage_sizes(whole, (128, 128)) == stage_sizes(whole.backbone, (128, 128))


def test_a_whole_model_conversion_writes_what_it_always_wrote() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2))
    gm, report = convert(model, (32, 32))
    assert "submodule" not in report.to_dict()
    options = gm.meta[RECIPE_KEY]["options"]
    assert "submodule" not in options and "anchors" not in options
    assert set(options) == {"placement", "init_scale", "overrides", "sizes", "leaf_modules", "patchify", "head"}
    with pytest.raises(OptionError, match="anchors applies to a converted part"):
        convert(model, (32, 32), anchors="float")


def test_save_load_gives_identical_outputs(converted, tmp_path) -> None:
    whole, _ = converted
    dynoswap.save(whole, tmp_path / "m")
    document = json.loads((tmp_path / "m" / "recipe.json").read_text())
    assert document["recipe"]["options"]["submodule"] == "backbone"
    back = dynoswap.load(tmp_path / "m")
    assert type(back) is type(whole) and isinstance(back.backbone, fx.GraphModule)
    assert type(back.rpn.anchor_generator).__name__ == "FloatStrideAnchorGenerator"
    assert type(back.roi_heads.box_roi_pool).__name__ == "FloatScaleRoIAlign"
    own, loaded = whole.state_dict(), back.state_dict()
    assert list(own) == list(loaded) and all(torch.equal(own[k], loaded[k]) for k in own)
    whole.eval(), back.eval()
    with torch.no_grad():
        a, b = whole(_images()), back(_images())
    assert a[0].keys() == b[0].keys()
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    # A recipe naming a part the rebuilt model lacks, or no path at all, is refused before any weight loads.
    for bad, message in (("neck", "FasterRCNN has no child 'neck'"), ("__class__.x()", "must be a dotted submodule")):
        document["recipe"]["options"]["submodule"] = bad
        (tmp_path / "m" / "recipe.json").write_text(json.dumps(document))
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            dynoswap.load(tmp_path / "m")


def test_freeze_freezes_the_part_in_place_and_loads_back(converted, tmp_path) -> None:
    whole, _ = converted
    frozen = dynoswap.freeze(whole)
    assert type(frozen) is type(whole)
    assert not any(isinstance(m, DynOPool2d) for m in frozen.modules())
    assert any(isinstance(m, DynOPool2d) for m in whole.modules())  # freeze copies
    assert recipe_of(frozen).frozen is not None and recipe_of(frozen).options.submodule == "backbone"
    x = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    whole.eval(), frozen.eval()
    with torch.no_grad():
        want, got = whole.backbone(x), frozen.backbone(x)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
    dynoswap.save(frozen, tmp_path / "f")
    back = dynoswap.load(tmp_path / "f")
    assert not any(isinstance(m, DynOPool2d) for m in back.modules())
    with torch.no_grad():
        a, b = frozen.eval()(_images()), back.eval()(_images())
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_a_missing_submodule_lists_the_candidates(detector) -> None:
    with pytest.raises(OptionError) as err:
        convert(detector, (128, 128), submodule="backbon")
    assert str(err.value) == (
        "submodule 'backbon' does not exist: FasterRCNN has no child 'backbon'; parts with pools or strided convs: "
        "backbone"
    )
    with pytest.raises(OptionError, match="'backbone' has no child 'bodyy'; parts with pools or strided convs: "):
        convert(detector, (128, 128), submodule="backbone.bodyy")
    assert part_candidates(detector.backbone, "backbone.") == ["backbone.body"]


@pytest.mark.parametrize("path", ["", "a..b", ".a", "a.", "__import__('os')", "a b", "x" * 201, "bäck"])
def test_a_malformed_path_is_refused(detector, path) -> None:
    with pytest.raises(OptionError, match="submodule"):
        convert(detector, (128, 128), submodule=path)


def test_the_recipe_validates_the_part_strictly(converted) -> None:
    whole, _ = converted
    data = copy.deepcopy(whole.meta[RECIPE_KEY])
    assert Recipe.from_dict(data).to_dict() == data
    for bad, message in (
        ("os.system('x')", "field 'recipe.options.submodule' must be a dotted submodule path"),
        ("a" * 201, "field 'recipe.options.submodule' is 201 characters long"),
        (7, "field 'recipe.options.submodule' must be a dotted submodule path such as 'backbone', got int"),
    ):
        data["options"]["submodule"] = bad
        with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(")", r"\)")):
            Recipe.from_dict(data)
    data["options"]["submodule"] = "backbone"
    data["options"]["anchors"] = "half"
    with pytest.raises(RecipeError, match="field 'recipe.options.anchors' must be one of float, integer"):
        Recipe.from_dict(data)


def test_a_whole_model_trace_failure_suggests_the_part(detector) -> None:
    with pytest.raises(TraceError) as err:
        convert(detector, (128, 128))
    message = str(err.value)
    assert message.startswith("dynoswap cannot trace FasterRCNN as a whole (Proxy object cannot be iterated")
    assert "convert(model, input_size, submodule='backbone')" in message
    assert "`dynoswap convert MODEL --submodule backbone`" in message
    assert message.endswith("Parts with pools or strided convs, largest first: backbone")
    assert "\n" not in message


def test_a_converted_model_is_refused(converted) -> None:
    whole, _ = converted
    with pytest.raises(TieError, match=r"already converted \(its part 'backbone'\)"):
        convert(whole, (128, 128), submodule="backbone")


def test_integer_anchors_keep_torchvisions_generator(detector) -> None:
    whole, _ = convert(detector, (128, 128), submodule="backbone", anchors="integer")
    assert type(whole.rpn.anchor_generator) is type(detector.rpn.anchor_generator)
    assert type(whole.roi_heads.box_roi_pool) is type(detector.roi_heads.box_roi_pool)
    assert recipe_of(whole).options.anchors == "integer"
    with pytest.raises(OptionError, match="anchors must be one of"):
        convert(detector, (128, 128), submodule="backbone", anchors="round")


class _Classifier(nn.Module):
    """A whole model whose part ``features`` holds the resizers."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def test_export_takes_the_whole_model(tmp_path) -> None:
    from dynoswap.export import export_model

    torch.manual_seed(0)
    whole, report = convert(_Classifier().eval(), (32, 32), submodule="features")
    assert report.num_dynopools == 2
    result = export_model(whole, tmp_path / "m.pt2", "pt2")
    assert result.input_size == (32, 32) and result.dynopools == 2
    assert result.max_abs_diff <= 1e-5
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(program(x), whole(x), rtol=0, atol=1e-5)
    assert program(x).shape == (1, 4)
