"""Safe checkpoint loading: formats, wrappers, DDP prefixes, pickled code refused, key matching."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from dynoswap.cli.common import exit_code_of
from dynoswap.io.checkpoint import (
    CheckpointError,
    KeyMismatchError,
    apply_state_dict,
    compare_keys,
    load_state_dict_file,
    strip_prefixes,
    unwrap_state_dict,
)

MARKER_NAME = "pickled_code_ran"


class WritesMarker:
    """Unpickling this would call open(marker, "w"): the code that weights_only must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def state_of(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": s, "epoch": 3},
        lambda s: {"model": s, "optimizer": {"lr": 0.1}},
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
        lambda s: {"model": {f"module._orig_mod.{k}": v for k, v in s.items()}},
    ],
    ids=["bare", "state_dict", "model", "ddp", "ddp+compile"],
)
def test_pickle_formats_unwrap_to_the_same_state(tmp_path, wrap):
    state = state_of()
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(state), path)
    assert_same(load_state_dict_file(path), state)


def test_safetensors_with_ddp_prefix(tmp_path):
    state = state_of()
    path = tmp_path / "ckpt.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in state.items()}, str(path))
    assert_same(load_state_dict_file(path), state)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": state_of(), "extra": WritesMarker(marker)}, path)
    with pytest.raises(CheckpointError, match="refused .*pickled code") as info:
        load_state_dict_file(path)
    assert exit_code_of(info.value) == 1
    assert not marker.exists()
    # The same object unpickled without weights_only does write the marker: the test can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_unreadable_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_state_dict_file(junk)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict_file(bad)


def test_each_unreadable_file_gets_its_own_message(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match="neither a PyTorch checkpoint nor a safetensors file") as info:
        load_state_dict_file(noise)
    assert "pickled code" not in str(info.value)
    with pytest.raises(CheckpointError, match="is a folder, not a file"):
        load_state_dict_file(tmp_path)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth is empty \(0 bytes\)"):
        load_state_dict_file(empty)
    truncated = tmp_path / "truncated.pth"
    torch.save(state_of(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_state_dict_file(truncated)


def test_container_without_tensors_is_an_error():
    with pytest.raises(CheckpointError, match="no tensors"):
        unwrap_state_dict({"epoch": 3, "lr": 0.1})
    with pytest.raises(CheckpointError, match="not a state dict"):
        unwrap_state_dict([1, 2])


def test_strip_prefixes_only_when_every_key_has_it():
    assert strip_prefixes({"module.a": 1, "module.b": 2}) == {"a": 1, "b": 2}
    assert strip_prefixes({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}


def test_key_mismatch_is_reported_and_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = state_of()
    state.pop("1.running_var")
    state["2.weight"] = torch.zeros(1)
    state["0.weight"] = torch.zeros(4, 3, 5, 5)
    mismatch = compare_keys(model, state)
    assert mismatch.missing == ["1.running_var"]
    assert mismatch.unexpected == ["2.weight"]
    assert mismatch.shape == [("0.weight", (4, 3, 3, 3), (4, 3, 5, 5))]
    assert mismatch.summary() == "1 missing, 1 unexpected, 1 with another shape"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(KeyMismatchError, match="allow_missing=True"):
        apply_state_dict(model, state)
    assert_same(model.state_dict(), before)  # nothing loaded on refusal


def test_allow_missing_loads_what_matches():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = state_of(seed=5)
    state.pop("1.running_var")
    old_var = model.state_dict()["1.running_var"].clone()
    mismatch = apply_state_dict(model, state, allow_missing=True)
    assert mismatch.missing == ["1.running_var"]
    assert torch.equal(model[0].weight, state["0.weight"])
    assert torch.equal(model[1].running_var, old_var)
