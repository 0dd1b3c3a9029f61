"""Latency tables: the JSON round trip, the cost's value at integer sizes, its gradient to every tie group."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from sweep_models import move_independently, owners
from typer.testing import CliRunner

import dynoswap
from dynoswap.cli.app import app
from dynoswap.cost.latency import LatencyTable, LayerLatency, latency_cost, lookup_backend, predict_latency, profile
from dynoswap.cost.resolution import resolution_graph
from dynoswap.errors import LatencyTableError, OptionError, OutputExistsError
from dynoswap.layers import DynOPool2d

SIZE = (64, 56)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    gm, _ = dynoswap.convert(torchvision.models.resnet18(num_classes=10), SIZE)
    return gm.eval()


def synthetic_table(model, knots=(50.0, 400.0, 900.0, 4000.0)) -> LatencyTable:
    """A table without timing: every conv, norm and DynOPool gets its own increasing, kinked curve.

    (Those layers' cost follows their output size; the global pool's follows its input.)
    """
    layers = {}
    kinds = (torch.nn.Conv2d, torch.nn.BatchNorm2d, DynOPool2d)
    for i, layer in enumerate(resolution_graph(model).layers):
        if layer.name in layers or not isinstance(model.get_submodule(layer.name), kinds):
            continue
        ms = [0.01 * (i + 1) * k ** (0.8 + 0.05 * j) / 100 for j, k in enumerate(knots)]
        layers[layer.name] = LayerLatency(layer.name, tuple(knots), tuple(ms))
    return LatencyTable("resnet18", "eager", "test", SIZE, 1, layers, scale=1.3, offset_ms=0.25)


def _actual_pixels(model, names):
    """Output h*w of each named module in a real forward pass (the first call of each)."""
    seen = {}

    def record(name, out):
        seen.setdefault(name, out.shape[-2] * out.shape[-1])

    handles = [model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: record(n, out)) for n in names]
    with torch.no_grad():
        model(torch.zeros(1, 3, *SIZE))
    for h in handles:
        h.remove()
    return seen


def test_table_round_trip_through_json(tmp_path, resnet18):
    table = synthetic_table(resnet18)
    table = LatencyTable(**{**table.__dict__, "validation": {"settings": 20.0, "median_abs_error": 0.1}})
    path = table.save(tmp_path / "t.json")
    loaded = LatencyTable.load(path)
    assert loaded == table
    assert loaded.to_dict() == json.loads(path.read_text())
    with pytest.raises(OutputExistsError, match="already holds a dynoswap latency table"):
        table.save(path)
    table.save(path, overwrite=True)
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(OutputExistsError, match="not a dynoswap latency table"):
        table.save(tmp_path / "other.json", overwrite=True)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d.clear(), "is not a dynoswap latency table"),
        (lambda d: d.update(dynoswap_latency_table=9), "version 9 is not 1"),
        (lambda d: d["layers"][0].update(pixels=[3.0, 2.0, 1.0, 0.5]), "pixel counts must increase"),
        (lambda d: d["layers"][0].update(ms=[1.0]), "as many pixel counts as times"),
        (lambda d: d["layers"][0].update(ms=[1.0, float("nan"), 2.0, 3.0]), "finite and >= 0"),
        (lambda d: d.update(scale=0), "scale must be finite and > 0"),
        (lambda d: d.pop("batch"), "is malformed"),
    ],
)
def test_a_malformed_table_is_one_clear_error(tmp_path, resnet18, corrupt, message):
    data = synthetic_table(resnet18).to_dict()
    corrupt(data)
    (tmp_path / "t.json").write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match=message):
        LatencyTable.load(tmp_path / "t.json")
    assert issubclass(LatencyTableError, OptionError)  # the CLI's exit code 2


def test_missing_or_non_json_file(tmp_path):
    with pytest.raises(LatencyTableError, match="cannot read latency table"):
        LatencyTable.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(LatencyTableError, match="is not JSON"):
        LatencyTable.load(tmp_path / "bad.json")


def test_curve_is_piecewise_linear_and_extends_its_end_segments():
    curve = LayerLatency("c", (100.0, 200.0, 400.0), (1.0, 3.0, 4.0))
    assert [curve.predict(p) for p in (100, 150, 200, 300, 400, 600)] == [1.0, 2.0, 3.0, 3.5, 4.0, 5.0]
    assert curve.predict(50) == 0.0  # the first segment continued, never below 0
    assert LayerLatency("k", (10.0,), (2.5,)).predict(1e6) == 2.5
    x = torch.tensor(300.0, dtype=torch.float64, requires_grad=True)
    value = curve.predict_tensor(x)
    value.backward()
    assert value.item() == 3.5 and x.grad.item() == pytest.approx(1 / 200)


def test_cost_equals_the_table_at_the_integer_sizes_the_model_runs_at(resnet18):
    model = copy.deepcopy(resnet18)
    move_independently(model, seed=3, low=0.35, high=1.2)
    table = synthetic_table(model)
    # Independent of the resolution graph: the sizes of a real forward pass.
    pixels = _actual_pixels(model, list(table.layers))
    expected = 1.3 * sum(table.layers[n].predict(p) for n, p in pixels.items()) + 0.25
    cost = latency_cost(model, table)
    assert cost.dtype == torch.float64 and cost.dim() == 0
    assert cost.item() == pytest.approx(expected, rel=1e-12)
    assert predict_latency(model, table) == pytest.approx(expected, rel=1e-12)


def test_gradient_reaches_every_tie_group_and_moving_each_group_alone_follows_it(resnet18):
    model = copy.deepcopy(resnet18)
    table = synthetic_table(model)
    groups = owners(model)
    assert len(groups) >= 4
    cost = latency_cost(model, table)
    cost.backward()
    for name, layer in groups.items():
        grad = layer.alpha.grad
        assert grad is not None and (grad < 0).all(), f"{name}: a larger alpha (smaller maps) must cost less"
    for name in groups:
        moved = copy.deepcopy(model)
        target = dict(moved.named_modules())[name]
        assert isinstance(target, DynOPool2d)
        with torch.no_grad():
            target.alpha.mul_(0.6)  # this group alone: its sizes (and those after it) grow
        assert latency_cost(moved, table).item() > cost.item(), name


def test_a_table_of_another_model_is_refused(resnet18):
    other, _ = dynoswap.convert(torchvision.models.mobilenet_v3_small(num_classes=10), SIZE)
    with pytest.raises(LatencyTableError, match="names layers this model does not have"):
        latency_cost(other, synthetic_table(resnet18))


def test_backends_that_cannot_run_are_refused_cleanly():
    with pytest.raises(LatencyTableError, match="unknown latency backend 'tpu'"):
        lookup_backend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(LatencyTableError, match="CUDA is not available"):
            lookup_backend("cuda")


def test_profile_measures_every_deployed_layer_and_restores_the_alphas(resnet18):
    model = copy.deepcopy(resnet18)
    before = {n: m.alpha.detach().clone() for n, m in owners(model).items()}
    result = profile(model, backend="eager", repeats=1, calibrate=2, validate=2, factors=(0.5, 1.0))
    table = result.table
    assert all(torch.equal(m.alpha, before[n]) for n, m in owners(model).items())
    graph_names = {layer.name for layer in resolution_graph(model).layers}
    convs = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    pools = {n for n, m in model.named_modules() if isinstance(m, DynOPool2d)}
    # Every conv and DynOPool is timed; batch norms are folded when deployed, so they cost nothing.
    assert (convs | pools) & graph_names <= set(table.layers) <= graph_names
    assert not norms & set(table.layers)
    assert table.backend == "eager" and table.input_size == SIZE and table.scale > 0
    assert len(result.validation) == 2 and table.validation is not None
    assert table.validation["settings"] == 2
    assert all(r.predicted > 0 and r.measured > 0 for r in result.validation)


def test_cli_profile_then_inspect_and_convert_with_the_table(tmp_path):
    runner = CliRunner()
    saved = tmp_path / "model"
    convert = ["convert", "resnet18", "--num-classes", "10", "--input-size", "64", "56"]
    out = runner.invoke(app, [*convert, "-o", str(saved)])
    assert out.exit_code == 0, out.output
    table = tmp_path / "t.json"
    args = ["profile", str(saved), "-o", str(table), "--repeats", "1", "--calibrate", "2", "--validate", "2"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "latency table written to" in out.output
    loaded = LatencyTable.load(table)
    out = runner.invoke(app, ["inspect", str(saved), "--latency-table", str(table), "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    model = dynoswap.load(saved)
    assert data["latency"]["predicted_ms"] == pytest.approx(predict_latency(model, loaded, SIZE))
    # convert reports what the table predicts for the model it converts (the saved one, before training).
    out = runner.invoke(app, [*convert, "--latency-table", str(table), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["latency"]["predicted_ms"] == pytest.approx(data["latency"]["predicted_ms"])
    # A second run refuses to overwrite; a missing table and an unknown backend are bad usage.
    assert runner.invoke(app, args).exit_code == 2
    assert runner.invoke(app, ["inspect", str(saved), "--latency-table", str(tmp_path / "no.json")]).exit_code == 2
    assert runner.invoke(app, [*args[:4], "--backend", "tpu"]).exit_code == 2


def _vgg_tiny_and_table():
    from dynoswap.models import ModelSource

    torch.manual_seed(0)
    source = ModelSource("dynoswap", "vgg-tiny", {"num_classes": 10})
    gm, _ = dynoswap.convert(source.build(), (32, 32), source=source)
    knots = (4.0, 64.0, 256.0, 1024.0)
    layers = {}
    for i, layer in enumerate(resolution_graph(gm).layers):
        if layer.name not in layers and isinstance(gm.get_submodule(layer.name), (torch.nn.Conv2d, DynOPool2d)):
            ms = tuple(0.002 * (i + 1) * k ** (0.9 + 0.05 * j) for j, k in enumerate(knots))
            layers[layer.name] = LayerLatency(layer.name, knots, ms)
    return gm, LatencyTable("vgg-tiny", "eager", "test", (32, 32), 1, layers, scale=1.0, offset_ms=0.1)


def test_training_to_a_latency_budget_lands_on_the_tables_prediction():
    from functools import partial

    from dynoswap.train import fit, load_data, make_loaders
    from dynoswap.train.loop import epoch_line

    gm, table = _vgg_tiny_and_table()
    bundle = load_data("barcodes", seed=0)
    train, val = make_loaders(bundle, 64, seed=0)
    target = 0.6 * predict_latency(gm, table)
    records = fit(gm, train, val, epochs=2, max_steps=6, lr=0.05, input_size=(32, 32), progress=False,
                  cost_fn=partial(latency_cost, table=table), target_gmacs=target, cost_unit="ms")  # fmt: skip
    final = predict_latency(gm, table)
    assert abs(final / target - 1) <= 0.03
    assert records[-1]["gmacs"] == pytest.approx(final, rel=1e-9) and records[-1]["cost_unit"] == "ms"
    assert f"ms {final:.4g} (target {target:.4g}" in epoch_line(records[-1], 2)


def test_cli_trains_to_a_latency_budget_and_checks_its_flags(tmp_path):
    runner = CliRunner()
    gm, table = _vgg_tiny_and_table()
    path = tmp_path / "t.json"
    table.save(path)
    target = round(0.6 * predict_latency(gm, table), 4)
    base = ["train", "vgg-tiny", "--data", "barcodes", "--epochs", "2", "--max-steps", "4", "--no-progress"]
    out = runner.invoke(
        app, [*base, "--out", str(tmp_path / "run"), "--latency-table", str(path), "--target-latency", str(target)]
    )
    assert out.exit_code == 0, out.output
    assert f"target {target:g} ms (real cost, projected every step)" in out.stdout
    line = next(line for line in out.stdout.splitlines() if line.startswith("final ms"))
    assert abs(float(line.split()[2].rstrip(",")) / target - 1) <= 0.03, line
    for extra, message in (
        (["--cost", "latency"], "--cost latency needs --latency-table"),
        (["--latency-table", str(path)], "--latency-table is used with --cost latency"),
        (["--latency-table", str(path), "--target-latency", "1", "--target-gmacs", "1"], "with --cost latency give"),
        (["--target-latency", "nan", "--latency-table", str(path)], "--target-latency must be a finite number > 0"),
        (["--cost", "watts"], "--cost must be gmacs or latency"),
    ):
        bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), *extra])
        assert bad.exit_code == 2 and message in bad.output, (extra, bad.output)
