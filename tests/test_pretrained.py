"""Pretrained weights from torchvision's and timm's own caches, seeded here: nothing is downloaded."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.error
from pathlib import Path

import pytest
import torch

from dynoswap.errors import ModelError
from dynoswap.models import ModelSource
from dynoswap.pretrained import apply_pretrained, torchvision_cache_file


@pytest.fixture
def no_download(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _seed_torchvision_cache(monkeypatch, tmp_path: Path, name: str) -> dict[str, torch.Tensor]:
    import torchvision
    from torchvision.models import get_model_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(123)
    state = getattr(torchvision.models, name)(num_classes=1000).state_dict()
    path = Path(torchvision_cache_file(get_model_weights(name).DEFAULT.url))
    assert path.is_relative_to(tmp_path)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_torchvision_weights_come_from_the_seeded_cache(monkeypatch, tmp_path, no_download):
    state = _seed_torchvision_cache(monkeypatch, tmp_path, "resnet18")
    source = ModelSource("torchvision", "resnet18", {"num_classes": 1000})
    model = source.build()
    report = apply_pretrained(model, source)
    assert report.kept == [] and report.loaded == len(state)
    assert report.source.endswith("resnet18-f37072fd.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_paper_network_takes_its_torchvision_twin_except_the_changed_stem(monkeypatch, tmp_path, no_download):
    state = _seed_torchvision_cache(monkeypatch, tmp_path, "resnet50")
    source = ModelSource("dynoswap", "paper:resnet50-cifar", {"num_classes": 100})
    model = source.build()
    report = apply_pretrained(model, source)
    assert report.kept == ["conv1.weight", "fc.bias", "fc.weight"]
    assert torch.equal(model.state_dict()["layer3.2.conv2.weight"], state["layer3.2.conv2.weight"])


def test_missing_torchvision_file_names_the_cache_path(monkeypatch, tmp_path, no_download):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    model = ModelSource("torchvision", "resnet18", {}).build()
    with pytest.raises(ModelError) as info:
        apply_pretrained(model, ModelSource("torchvision", "resnet18", {}))
    message = str(info.value)
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    assert "\n" not in message and "network disabled" in message


def test_no_pretrained_weights_for_user_models():
    with pytest.raises(ModelError, match="no pretrained weights for user:"):
        apply_pretrained(torch.nn.Linear(1, 1), ModelSource("user", "pkg.mod:factory", {}))


TIMM_CHECK = textwrap.dedent(
    """
    import sys, torch, timm
    from safetensors.torch import save_file
    from dynoswap.models import ModelSource
    from dynoswap.pretrained import apply_pretrained
    from dynoswap.errors import ModelError

    cache, mode = sys.argv[1], sys.argv[2]
    cfg = timm.models.get_pretrained_cfg("resnet18")
    if mode == "seeded":
        torch.manual_seed(7)
        state = timm.create_model("resnet18").state_dict()
        repo = cache + "/models--" + cfg.hf_hub_id.replace("/", "--")
        rev = "0" * 40
        import os
        os.makedirs(repo + "/refs")
        os.makedirs(repo + "/snapshots/" + rev)
        open(repo + "/refs/main", "w").write(rev)
        save_file({k: v.contiguous() for k, v in state.items()}, repo + "/snapshots/" + rev + "/model.safetensors")
        source = ModelSource("timm", "resnet18", {})
        model = source.build()
        report = apply_pretrained(model, source)
        assert report.kept == [], report.kept
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        print("LOADED", report.loaded)
    else:
        try:
            apply_pretrained(ModelSource("timm", "resnet18", {}).build(), ModelSource("timm", "resnet18", {}))
        except ModelError as err:
            print("ERROR", err)
    """
)


@pytest.mark.parametrize("mode", ["seeded", "empty"])
def test_timm_weights_come_from_the_seeded_hub_cache(tmp_path, mode):
    # huggingface_hub reads its cache and offline settings at import: a fresh interpreter gets them.
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    result = subprocess.run(
        [sys.executable, "-c", TIMM_CHECK, str(tmp_path), mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    if mode == "seeded":
        assert "LOADED 122" in result.stdout  # every tensor of resnet18, buffers included
    else:
        line = result.stdout.strip()
        assert line.startswith("ERROR pretrained resnet18: timm/resnet18.a1_in1k (model.safetensors)")
        assert str(tmp_path) in line and "\n" not in line
