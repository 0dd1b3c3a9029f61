"""Search then retrain (``fit(retrain=True)``, ``train --retrain``) and task losses other than cross-entropy."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from dynoswap.engine import convert
from dynoswap.errors import TrainingError
from dynoswap.models import ModelSource
from dynoswap.train import find_checkpoint, fit, load_data, read_log
from dynoswap.train.loop import dynopools, hits


def _model(seed=0):
    torch.manual_seed(seed)
    source = ModelSource("dynoswap", "vgg-tiny", {"widths": [8, 16, 32]})
    gm, _ = convert(source.build(), (32, 32), source=source)
    return gm


def _loader(n=128, batch=32):
    # Unshuffled: every epoch sees the same batches, so a retrain can be replayed by a second run.
    return DataLoader(Subset(load_data("barcodes").train, range(n)), batch_size=batch, shuffle=False)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


KW = dict(lr=0.05, alpha_lr=0.1, lam=40.0, max_steps=2, progress=False)


def test_retrain_trains_the_landed_sizes_from_the_starting_weights():
    """Steps after the landing equal a fresh fixed-size run from the starting weights at the learned alphas."""
    model = _model()
    start = _state(model)
    records = fit(model, _loader(), epochs=4, search_end=0.5, warmup=0.0, retrain=True, **KW)
    assert [r["phase"] for r in records] == ["search", "search", "retrain", "retrain"]
    learned = {f"{n}.alpha": p.alpha.detach().clone() for n, p in dynopools(model)}
    assert any(not torch.equal(learned[k], start[k]) for k in learned)  # the search moved the sizes

    replay = _model(seed=1)  # other weights: all must come from `start`
    replay.load_state_dict({**start, **learned})
    fit(replay, _loader(), epochs=2, search_end=0.0, warmup=0.0, **KW)
    got, want = _state(model), _state(replay)
    assert got.keys() == want.keys()
    for key in got:
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-6), key


def test_without_retrain_the_weights_carry_on_from_the_search():
    model, other = _model(), _model()
    plain = fit(model, _loader(), epochs=4, search_end=0.5, warmup=0.0, **KW)
    fit(other, _loader(), epochs=4, search_end=0.5, warmup=0.0, retrain=True, **KW)
    assert [r["phase"] for r in plain] == ["search", "search", "fixed", "fixed"]
    a, b = _state(model), _state(other)
    assert all(torch.equal(a[k], b[k]) for k in a if k.endswith(".alpha"))  # same search, same landing
    assert any(not torch.equal(a[k], b[k]) for k in a if not k.endswith(".alpha"))  # only the retrain restarted


def test_retrain_resumes_exactly_across_the_landing(tmp_path):
    kw = dict(epochs=4, search_end=0.5, warmup=0.0, retrain=True, **KW)
    reference = _model()
    fit(reference, _loader(), out=tmp_path / "ref", **kw)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _loader(), out=tmp_path / "run", on_epoch_end=stop_after_first, **kw)
    state = torch.load(find_checkpoint(tmp_path / "run") / "train_state.pt", weights_only=True)
    assert "starting_weights" in state  # kept until the landing restarts from them
    resumed = _model(seed=5)  # other weights: the start must come from the checkpoint
    fit(resumed, _loader(), out=tmp_path / "run", resume=True, **kw)
    for key, value in _state(reference).items():
        assert torch.equal(value, _state(resumed)[key]), key
    assert [r["phase"] for r in read_log(tmp_path / "run")] == ["search", "search", "retrain", "retrain"]
    after = torch.load(find_checkpoint(tmp_path / "run") / "train_state.pt", weights_only=True)
    assert "starting_weights" not in after


def test_retrain_cannot_resume_a_checkpoint_written_without_it(tmp_path):
    kw = dict(epochs=4, search_end=0.75, warmup=0.0, **KW)

    def stop_after_first(record):
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_model(), _loader(), out=tmp_path / "run", on_epoch_end=stop_after_first, **kw)
    with pytest.raises(TrainingError, match="without retrain"):
        fit(_model(), _loader(), out=tmp_path / "run", resume=True, retrain=True, **kw)


def test_hits_counts_images_pixels_or_nothing():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert hits(logits, torch.tensor([1, 1, 1])) == (2.0, 3.0)
    seg = torch.zeros(2, 3, 4, 5)
    seg[:, 2] = 1.0
    labels = torch.full((2, 4, 5), 2)
    labels[0, 0, 0] = 1
    assert hits(seg, labels) == (39.0, 40.0)
    assert hits(logits, torch.rand(3, 2)) is None  # regression targets
    assert hits(seg, torch.zeros(2, 4, 4, dtype=torch.long)) is None  # shapes that do not line up
    assert hits(logits, torch.tensor([True, False, True])) is None


def test_a_custom_loss_trains_and_is_logged_without_accuracy():
    """A regression target: the loss is the caller's, and no accuracy is made up."""
    model = _model()
    images = torch.randn(64, 3, 32, 32)
    targets = torch.randn(64, 10)
    loader = DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=32)
    seen = []
    records = fit(
        model, loader, loader, epochs=1, lr=0.01, loss_fn=F.mse_loss, progress=False,
        on_step=lambda step, m: seen.append(m["task"]),
    )  # fmt: skip
    assert "train_acc" not in records[0] and "val_acc" not in records[0]
    with torch.no_grad():
        model.eval()
        expected = float(F.mse_loss(model(images), targets))
    assert records[0]["val_loss"] == pytest.approx(expected, rel=1e-5)
    assert all(v > 0 for v in seen)


def test_a_custom_classification_loss_is_the_one_optimised():
    model = _model()
    seen = []
    smooth = lambda out, y: F.cross_entropy(out, y, label_smoothing=0.5)  # noqa: E731
    records = fit(
        model, _loader(32), epochs=1, lr=0.0, alpha_lr=0.0, loss_fn=smooth, progress=False,
        on_step=lambda step, m: seen.append(m["task"]),
    )  # fmt: skip
    images, labels = next(iter(_loader(32)))
    with torch.no_grad():
        model.train()
        want = float(smooth(model(images), labels))
    assert seen[0] == pytest.approx(want, rel=1e-5)
    assert 0.0 <= records[0]["train_acc"] <= 1.0


def test_cli_retrain_logs_the_retrain_phase(tmp_path):
    from typer.testing import CliRunner

    from dynoswap.cli import app

    out = tmp_path / "run"
    args = ["train", "vgg-tiny", "--data", "barcodes", "--epochs", "2", "--max-steps", "2", "--batch-size", "16"]
    args += ["--lam", "50", "--no-progress", "--model-kwargs", "widths=[8, 16]", "--retrain", "--out", str(out)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "150", "NO_COLOR": "1", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    assert [r["phase"] for r in read_log(out)] == ["search", "retrain"]


def test_fit_progress_bar_shows_an_eta():
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=200, color_system=None)
    fit(_model(), _loader(64), epochs=1, lr=0.01, max_steps=2, console=console)
    assert "eta" in buffer.getvalue()


def test_fit_printing_to_a_pipe_never_breaks_an_epoch_line(capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    fit(_model(), _loader(64), epochs=1, lr=0.01, max_steps=2, target_gmacs=0.002, input_size=(32, 32))
    lines = capsys.readouterr().out.splitlines()
    epoch = [line for line in lines if line.startswith("epoch 1/1")]
    assert len(epoch) == 1 and len(epoch[0]) > 80 and "sizes " in epoch[0], lines
