"""Pretrained weights through torchvision's weights enums and timm's ``pretrained=True``.

Both libraries download into and read from their own caches (torchvision:
``$TORCH_HOME/hub/checkpoints/<file>``; timm: the Hugging Face hub cache,
``$HF_HUB_CACHE``), so a file placed there is used without any network. Files are
loaded with ``weights_only=True`` (torchvision) or as safetensors (timm's default).

Weights go into an already built model (:func:`apply_pretrained`) instead of into the
model's build arguments: a recipe never carries ``pretrained=True`` or a weights enum,
so loading a saved model never downloads anything. The paper's networks
(``paper:*``) take the weights of the torchvision model they share layers with; their
changed head or stem keep their own initialisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from .errors import ModelError

if TYPE_CHECKING:
    from torch import nn

    from .models import ModelSource

#: Zoo models whose layers are torchvision's (same state-dict keys where the layers are the same).
TORCHVISION_TWIN = {
    "paper:vgg16": "vgg16_bn",
    "paper:vgg16-cifar": "vgg16_bn",
    "paper:resnet50": "resnet50",
    "paper:resnet50-cifar": "resnet50",
    "paper:mobilenet_v2": "mobilenet_v2",
    "paper:mobilenet_v2-cifar": "mobilenet_v2",
}


@dataclass
class PretrainedReport:
    """What :func:`apply_pretrained` loaded.

    Attributes:
        source: Where the weights came from (a file in a cache, or a timm model name).
        loaded: Number of tensors loaded.
        kept: Keys of the model that kept their own values (a changed head or stem).
    """

    source: str
    loaded: int
    kept: list[str] = field(default_factory=list)


def torchvision_cache_file(url: str) -> str:
    """Return the file torchvision reads a weights URL from: ``<torch hub dir>/checkpoints/<file name>``."""
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def _torchvision_state(name: str) -> tuple[dict[str, Any], str]:
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError) as err:
        raise ModelError(f"torchvision has no pretrained weights for {name!r}") from err
    path = torchvision_cache_file(weights.url)
    try:
        state = weights.get_state_dict(progress=False, weights_only=True)
    except OSError as err:  # URLError is an OSError: offline and not cached
        raise ModelError(
            f"pretrained {name}: {path} is not in torchvision's cache and downloading it failed ({err}); "
            "put the file there or retry with network access"
        ) from err
    return state, path


def _timm_state(name: str, kwargs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    import timm

    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as err:
        cfg = timm.models.get_pretrained_cfg(name)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        where = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface/hub"
        looked = f"{hub_id} (model.safetensors) in the Hugging Face cache {where}" if hub_id else "timm's cache"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(
            f"pretrained {name}: {looked} is not there and downloading it failed ({reason}); "
            "put the file there or retry with network access"
        ) from err
    return model.state_dict(), f"timm:{name}"


def pretrained_state(source: ModelSource) -> tuple[dict[str, Any], str]:
    """Return the pretrained state dict of a model source and where it came from.

    Raises:
        ModelError: No pretrained weights exist for the source, or they are neither cached nor downloadable.
    """
    if source.library == "torchvision":
        return _torchvision_state(source.name)
    if source.library == "timm":
        return _timm_state(source.name, dict(source.kwargs))
    if source.library == "dynoswap" and source.name in TORCHVISION_TWIN:
        return _torchvision_state(TORCHVISION_TWIN[source.name])
    raise ModelError(
        f"no pretrained weights for {source.library}:{source.name}: pretrained weights come from torchvision, "
        "timm and the paper's networks (paper:*)"
    )


def apply_pretrained(model: nn.Module, source: ModelSource) -> PretrainedReport:
    """Load the pretrained weights of ``source`` into ``model`` (built from that source).

    Every tensor whose key and shape match is loaded; the others (a classifier for another
    number of classes, the paper's CIFAR stem) keep the model's own values and are listed.

    Raises:
        ModelError: As :func:`pretrained_state`, or when no tensor matches at all.
    """
    import torch

    state, where = pretrained_state(source)
    own = model.state_dict()
    matched = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not matched:
        raise ModelError(f"pretrained weights from {where} share no tensor with {source.library}:{source.name}")
    with torch.no_grad():
        model.load_state_dict(matched, strict=False)
    kept = sorted(set(own) - set(matched))
    return PretrainedReport(where, len(matched), kept)
