import math

import pytest
import torch

from kilter.losses import kto_loss, kto_reference_kl


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_kto_by_hand():
    # r = 0 - (-2) = 2 for both; z0 = 1, beta = 0.5
    # desirable:   1 * (1 - sigmoid(0.5 * (2 - 1)))  = 1 - sigmoid(0.5)  = 0.377541
    # undesirable: 2 * (1 - sigmoid(0.5 * (1 - 2)))  = 2 * sigmoid(0.5)  = 1.244919
    losses, rewards = kto_loss(
        torch.tensor([0.0, 0.0]),
        torch.tensor([-2.0, -2.0]),
        torch.tensor([True, False]),
        kl_ref=torch.tensor(1.0),
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    assert losses[0].item() == pytest.approx(1 - _sigmoid(0.5))
    assert losses[1].item() == pytest.approx(2 * _sigmoid(0.5))
    assert torch.allclose(rewards, torch.tensor([1.0, 1.0]))


def test_kto_reference_point_is_clamped_and_detached():
    kl_ref = torch.tensor(-3.0, requires_grad=True)
    policy = torch.tensor([0.0], requires_grad=True)
    losses, _ = kto_loss(policy, torch.tensor([0.0]), torch.tensor([True]), kl_ref, beta=1.0)
    # z0 clamped to 0, r = 0 -> 1 - sigmoid(0) = 0.5
    assert losses.item() == pytest.approx(0.5)
    losses.sum().backward()
    assert kl_ref.grad is None
    # d/dr of 1 - sigmoid(r) at 0 = -1/4: a desirable response's log-prob is pushed up
    assert policy.grad.item() == pytest.approx(-0.25)


def test_kto_reference_kl():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    # mean(1, 0) = 0.5
    z0 = kto_reference_kl(policy, torch.tensor([-2.0, -2.0]))
    assert z0.item() == pytest.approx(0.5) and not z0.requires_grad
    # a negative estimate is clamped to 0
    assert kto_reference_kl(torch.tensor([-5.0]), torch.tensor([-1.0])).item() == 0.0


def test_kto_reference_point_from_sums_by_hand():
    from kilter.losses import kto_reference_point

    assert kto_reference_point(3.0, 4).item() == pytest.approx(0.75)
    assert kto_reference_point(-1.0, 2).item() == 0.0  # clamped at 0
    assert kto_reference_point(0.0, 0).item() == 0.0  # no mismatched responses
    # two processes' shares added before dividing equal the mean over all of them
    a, b = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-2.0, -2.5, -1.5])
    whole = kto_reference_kl(a, b)
    split = kto_reference_point(float((a[:2] - b[:2]).sum()) + float((a[2:] - b[2:]).sum()), 3)
    assert split.item() == pytest.approx(whole.item()) == pytest.approx(2.5 / 3)
