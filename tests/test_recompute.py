"""Training view that recomputes rule (2)'s high-resolution segments: same numbers, less kept."""

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dynoswap import convert
from dynoswap.errors import ConversionError
from dynoswap.train.recompute import RecomputeSegment, recompute_view, saved_activation_bytes

SIZE = (48, 40)


def _converted(seed: int = 0, placement: str = "post") -> nn.Module:
    torch.manual_seed(seed)
    gm, _ = convert(torchvision.models.resnet18(num_classes=5), SIZE, placement=placement)
    # Move every tie group on its own so the segments run at sizes no other group shares.
    for i, pool in enumerate(m for m in gm.modules() if getattr(m, "leader", None) is m):
        pool.set_scale((0.41 + 0.07 * i, 0.63 - 0.05 * i))
    return gm


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


def test_view_gives_the_same_loss_gradients_and_norm_statistics():
    plain = _converted()
    shared = copy.deepcopy(plain)
    view = recompute_view(shared)
    assert sum(isinstance(m, RecomputeSegment) for m in view.modules()) == 7  # stem + 3 strided convs + 3 downsamples
    x, y = torch.randn(3, 3, *SIZE), torch.tensor([0, 3, 4])
    plain.train()
    view.train()
    torch.manual_seed(1)
    expected = _step(plain, x, y)
    torch.manual_seed(1)
    got = _step(view, x, y)
    assert torch.equal(expected, got)
    grads = {k: p.grad for k, p in plain.named_parameters()}
    for key, p in shared.named_parameters():
        assert p.grad is not None, key
        torch.testing.assert_close(p.grad, grads[key], rtol=1e-5, atol=1e-6, msg=key)
    # Running statistics were updated once, not twice (the recomputation leaves them alone).
    for (key, a), b in zip(plain.state_dict().items(), shared.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=key)


def test_view_shares_parameters_and_state_dict_keys():
    model = _converted()
    view = recompute_view(model)
    assert set(view.state_dict()) == set(model.state_dict())
    assert {id(p) for p in view.parameters()} == {id(p) for p in model.parameters()}
    with torch.no_grad():
        model.eval()
        view.eval()
        x = torch.randn(2, 3, *SIZE)
        assert torch.equal(view(x), model(x))


def test_view_keeps_less_for_backward():
    model = _converted()
    view = recompute_view(copy.deepcopy(model))
    x, y = torch.randn(4, 3, *SIZE), torch.tensor([0, 1, 2, 3])
    kept = {}
    for name, net in (("plain", model), ("view", view)):
        net.train()
        with saved_activation_bytes(net) as result:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        kept[name] = result[0]
    assert kept["view"] < 0.4 * kept["plain"], kept


def test_pre_placement_has_nothing_to_recompute():
    model = _converted(placement="pre")
    view = recompute_view(model)
    assert not any(isinstance(m, RecomputeSegment) for m in view.modules())


def test_plain_model_is_refused():
    with pytest.raises(ConversionError, match="dynoswap.convert"):
        recompute_view(torchvision.models.resnet18())


def _tiny_strided() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def test_fit_with_recompute_trains_the_same_run():
    from torch.utils.data import DataLoader, TensorDataset

    from dynoswap.train import fit

    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, 20, 18), torch.randint(0, 3, (24,)))
    runs = {}
    for recompute in (False, True):
        torch.manual_seed(0)
        gm, _ = convert(_tiny_strided(), (20, 18))
        assert sum(isinstance(m, RecomputeSegment) for m in recompute_view(gm).modules()) == 2
        torch.manual_seed(1)
        loader = DataLoader(data, batch_size=8, shuffle=True)
        records = fit(gm, loader, epochs=2, lam=0.01, lr=0.05, alpha_lr=0.05, progress=False, recompute=recompute)
        runs[recompute] = (records, gm.state_dict())
    (plain, plain_state), (again, again_state) = runs[False], runs[True]
    for a, b in zip(plain, again, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for key, value in plain_state.items():
        torch.testing.assert_close(again_state[key], value, rtol=1e-4, atol=1e-5, msg=key)
