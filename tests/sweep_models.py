"""Which models the broad sweep converts: every torchvision classifier and segmenter, one timm model per family.

A timm *family* is a model module of the pinned timm (``timm.list_modules()``); its
representative is the model with the fewest parameters among ``timm.list_models(module=...)``
(counted on the meta device, ties broken by name), kept if it has a 2-D conv or pool.
The derivation is cached in ``tests/data/timm_families.json``; regenerate it with
``OMP_NUM_THREADS=1 python -m tests.sweep_models``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

FAMILIES_FILE = Path(__file__).parent / "data" / "timm_families.json"
TWO_D = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def _params_on_meta(name: str) -> tuple[int, bool] | None:
    import timm

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # a builder that computes on tensors: not countable on meta
        return None
    has_2d = any(isinstance(m, TWO_D) for m in model.modules())
    return sum(p.numel() for p in model.parameters()), has_2d


def derive_timm_families() -> dict:
    """Smallest model of every timm model module, and whether it has a 2-D conv or pool."""
    import timm

    families = {}
    for module in timm.list_modules():
        best = None
        for name in sorted(timm.list_models(module=module)):
            counted = _params_on_meta(name)
            if counted is not None and (best is None or counted[0] < best[1]):
                best = (name, counted[0], counted[1])
        if best is not None:
            families[module] = {"model": best[0], "params": best[1], "conv2d_or_pool2d": best[2]}
    return {"timm": timm.__version__, "derivation": __doc__.split("\n\n")[1].replace("\n", " "), "families": families}


def timm_families() -> dict[str, dict]:
    """The cached derivation: family -> {model, params, conv2d_or_pool2d} (empty before it is derived)."""
    if not FAMILIES_FILE.exists():
        return {}
    return json.loads(FAMILIES_FILE.read_text())["families"]


def torchvision_classifiers() -> list[str]:
    """Every torchvision classification model."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_segmenters() -> list[str]:
    """Every torchvision segmentation model."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models.segmentation))


# -- moving scales: every tie group on its own -----------------------------------------------
def owners(gm: nn.Module) -> dict[str, nn.Module]:
    """The DynOPool layers (any dimension) that own an alpha (one per tie group), by name."""
    from dynoswap.layers import DynOPoolNd

    return {n: m for n, m in gm.named_modules() if isinstance(m, DynOPoolNd) and m.leader is m}


def move_independently(gm: nn.Module, seed: int, low: float = 0.3, high: float = 0.8) -> None:
    """Every group to its own random scale, each axis on its own."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in owners(gm).values():
            m.set_scale(tuple((low + (high - low) * torch.rand(m.ndim, generator=g)).tolist()))


if __name__ == "__main__":
    torch.set_num_threads(1)
    data = derive_timm_families()
    FAMILIES_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"{len(data['families'])} families written to {FAMILIES_FILE}", file=sys.stderr)
