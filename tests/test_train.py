import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import dynoswap
from dynoswap.engine import convert
from dynoswap.errors import OptionError, TrainingError
from dynoswap.io.saving import load
from dynoswap.models import ModelSource
from dynoswap.train import (
    find_checkpoint,
    fit,
    load_data,
    mean_log_aspect,
    plot_history,
    probe_pools,
    read_log,
    small_vgg,
)
from dynoswap.train.checkpointing import load_checkpoint, save_checkpoint


def _model(widths=(8, 16, 32), seed=0):
    torch.manual_seed(seed)
    source = ModelSource("dynoswap", "vgg-tiny", {"widths": list(widths)})
    gm, _ = convert(source.build(), (32, 32), source=source)
    return gm


def _loader(n=256, batch=32, seed=0):
    bundle = load_data("barcodes")
    torch.manual_seed(seed)
    return DataLoader(Subset(bundle.train, range(n)), batch_size=batch, shuffle=True, drop_last=True)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_barcodes_learn_wider_than_tall_maps():
    """Section 3: with only horizontal information, lambda shrinks the height and the task keeps the width."""
    torch.manual_seed(0)
    model = small_vgg(widths=(16, 32, 64))
    gm, _ = convert(model, (32, 32))
    bundle = load_data("barcodes")
    loader = DataLoader(bundle.train, batch_size=64, shuffle=True)
    # lambda relative to the initial cost: the GMACs term is 0.03 of the loss at the start (at 0.3 it
    # outweighs the task's displacement gradient and both axes shrink alike; the paper's is about 1e-4).
    lam = 0.03 / float(dynoswap.gmacs_loss(gm).detach())
    records = fit(gm, loader, epochs=3, max_steps=25, lam=lam, lr=0.05, alpha_lr=0.1, progress=False)
    pools = records[-1]["pools"]
    assert records[-1]["train_acc"] > 0.9
    assert all(p["scale"][0] < 0.5 for p in pools)  # height shrank everywhere
    assert mean_log_aspect(pools) > 0.1  # mean log(r_w / r_h): wider than tall
    first = pools[0]
    assert first["scale"][1] > first["scale"][0] and first["out"][1] > first["out"][0]


def test_total_loss_is_task_plus_lambda_gmacs_and_alphas_get_no_weight_decay():
    model = _model()
    lam = 3.0
    seen = []
    alphas0 = [p.alpha.detach().clone() for _, p in _pools(model)]
    fit(
        model,
        _loader(64),
        epochs=1,
        lam=lam,
        lr=0.0,  # weights frozen: only alphas move
        alpha_lr=0.01,
        weight_decay=1.0,
        max_steps=1,
        progress=False,
        on_step=lambda step, m: seen.append(m),
    )
    (m,) = seen
    assert m["loss"] == pytest.approx(m["task"] + lam * m["gmacs"], rel=1e-6)
    # Eq. 7 at the initial alphas (the step is taken after the loss) is the GMACs count.
    assert m["gmacs"] == pytest.approx(float(dynoswap.count_gmacs(_model(), (32, 32)).total))
    # The alphas take their own normalised step (at most alpha_lr * sqrt(#axes) in log space) and no weight
    # decay: with weight decay 1.0 they would shrink by a factor (1 - lr * 1.0) instead.
    bound = 0.01 * math.sqrt(2 * len(alphas0)) + 1e-6
    for alpha0, (_, pool) in zip(alphas0, _pools(model), strict=True):
        assert float(torch.log(pool.alpha.detach() / alpha0).abs().max()) <= bound


def _pools(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, dynoswap.DynOPool2d)]


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path):
    kwargs = dict(epochs=3, lam=50.0, lr=0.05, alpha_lr=0.1, max_steps=4, progress=False)

    reference = _model()
    torch.manual_seed(123)
    fit(reference, _loader(), out=tmp_path / "ref", **kwargs)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    interrupted = _model()
    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        fit(interrupted, _loader(), out=tmp_path / "run", on_epoch_end=stop_after_first, **kwargs)
    assert torch.load(find_checkpoint(tmp_path / "run") / "train_state.pt", weights_only=True)["epoch"] == 1

    # An epoch logged after the last checkpoint (crash between the writes) must not repeat.
    with open(tmp_path / "run" / "log.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "stray": True}) + "\n")
    resumed = _model()  # fresh weights: all state must come from the checkpoint
    torch.manual_seed(999)  # and the RNG state too
    records = fit(resumed, _loader(), out=tmp_path / "run", resume=True, **kwargs)
    assert [r["epoch"] for r in records] == [2, 3]

    ref_state, res_state = _state(reference), _state(resumed)
    assert ref_state.keys() == res_state.keys()
    for key in ref_state:
        assert torch.equal(ref_state[key], res_state[key]), key
    assert [p.alpha.tolist() for _, p in _pools(reference)] == [p.alpha.tolist() for _, p in _pools(resumed)]
    log = read_log(tmp_path / "run")
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[-1]["pools"] == read_log(tmp_path / "ref")[-1]["pools"]


def test_ctrl_c_mid_epoch_keeps_last_complete_checkpoint(tmp_path):
    model = _model()
    after_first = {}

    def remember(record):
        after_first.update(_state(model))

    def interrupt(step, metrics):
        if step == 6:  # inside epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(
            model,
            _loader(),
            epochs=2,
            max_steps=4,
            lam=10.0,
            out=tmp_path,
            progress=False,
            on_epoch_end=remember,
            on_step=interrupt,
        )
    folder = find_checkpoint(tmp_path)
    assert folder == tmp_path / "checkpoint"
    fresh = _model(seed=5)
    state = load_checkpoint(folder, fresh)
    assert state["epoch"] == 1 and state["step"] == 4
    for key, value in _state(fresh).items():
        assert torch.equal(value, after_first[key]), key
    assert not (tmp_path / "checkpoint.tmp").exists() or find_checkpoint(tmp_path) == folder


def test_log_plot_and_saved_model_of_a_tiny_run(tmp_path):
    model = _model()
    bundle = load_data("barcodes")
    val = DataLoader(Subset(bundle.val, range(64)), batch_size=32)
    records = fit(model, _loader(), val, epochs=2, max_steps=3, lam=20.0, out=tmp_path, progress=False)
    log = read_log(tmp_path)
    assert log == json.loads(json.dumps(records))
    for record in log:
        assert {"epoch", "loss", "task_loss", "gmacs_loss", "gmacs", "train_acc", "val_acc", "pools"} <= set(record)
        assert [p["name"] for p in record["pools"]] == [n for n, _ in _pools(model)]
    # The logged sizes are the model's sizes (the size rule at the logged alphas) for a 32x32 input.
    sizes = dynoswap.stage_sizes(model, (32, 32))
    pools = probe_pools(model, (32, 32), torch.device("cpu"))
    assert [tuple(p["out"]) for p in log[-1]["pools"]] == [tuple(p["out"]) for p in pools]
    assert [tuple(p["out"]) for p in pools] == [tuple(s) for s in sizes[1 : len(pools) + 1]]
    assert log[-1]["gmacs"] == pytest.approx(float(dynoswap.gmacs_loss(model).detach()))
    png = plot_history(log, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Each checkpoint is also a dynoswap save that loads with the trained alphas; its weights are stored once.
    loaded = load(tmp_path / "checkpoint" / "model")
    assert [p.alpha.tolist() for _, p in _pools(loaded)] == [p.alpha.tolist() for _, p in _pools(model)]
    assert not (tmp_path / "checkpoint" / "weights.safetensors").exists()


def test_checkpoint_of_a_model_without_source_keeps_a_plain_state_dict(tmp_path):
    torch.manual_seed(0)
    model, _ = convert(small_vgg(widths=[8, 16, 32]), (32, 32))  # no source=: dynoswap.load cannot rebuild it
    with torch.no_grad():
        for _, pool in _pools(model):
            pool.alpha.add_(0.25)
    folder = save_checkpoint(tmp_path, model, {"epoch": 3})
    assert (folder / "weights.safetensors").is_file() and not (folder / "model").exists()
    torch.manual_seed(1)
    fresh, _ = convert(small_vgg(widths=[8, 16, 32]), (32, 32))
    assert load_checkpoint(find_checkpoint(tmp_path), fresh) == {"epoch": 3}
    for (key, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_fit_errors():
    with pytest.raises(TrainingError, match="no DynOPool layer"):
        fit(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), _loader(32), epochs=1, progress=False)
    with pytest.raises(OptionError, match="out="):
        fit(_model(), _loader(32), epochs=1, resume=True, progress=False)
    with pytest.raises(OptionError, match="epochs"):
        fit(_model(), _loader(32), epochs=0, progress=False)


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="no checkpoint"):
        fit(_model(), _loader(32), epochs=1, out=tmp_path, resume=True, progress=False)


def test_plot_needs_records(tmp_path):
    with pytest.raises(ValueError, match="no epoch records"):
        plot_history([], tmp_path / "x.png")


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.gpu,
        ),
    ],
)
def test_amp_steps_keep_float32_alphas(device):
    model = _model()
    records = fit(model, _loader(64), epochs=1, max_steps=2, lam=10.0, device=device, amp=True, progress=False)
    assert math.isfinite(records[0]["loss"]) and records[0]["step"] == 2
    assert all(p.alpha.dtype == torch.float32 and p.alpha.device.type == device for _, p in _pools(model))
