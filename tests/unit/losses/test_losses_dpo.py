import math

import pytest
import torch

from kilter.errors import ConfigError
from kilter.losses import dpo_loss


def test_dpo_policy_equal_ref_gives_log2():
    logps = torch.tensor([-3.0, -10.0, -0.5])
    other = torch.tensor([-4.0, -1.0, -7.0])
    losses, cr, rr = dpo_loss(logps, other, logps, other, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2)))
    assert torch.all(cr == 0) and torch.all(rr == 0)


def test_dpo_by_hand():
    # chosen log ratio -1 - (-2) = 1, rejected -3 - (-2) = -1, h = 2, beta h = 0.2
    t = torch.tensor
    losses, cr, rr = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.2)))  # 0.598139
    assert cr.item() == pytest.approx(0.1) and rr.item() == pytest.approx(-0.1)
    # conservative DPO, eps = 0.1: 0.9 * ln(1 + e^-0.2) + 0.1 * ln(1 + e^0.2)
    smoothed, _, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.1, label_smoothing=0.1)
    expected = 0.9 * math.log(1 + math.exp(-0.2)) + 0.1 * math.log(1 + math.exp(0.2))
    assert smoothed.item() == pytest.approx(expected)


def test_ipo_by_hand():
    z = torch.zeros(1)
    # h = 0 -> (0 - 1/(2 beta))^2 = 1 / (4 beta^2) = 25 for beta = 0.1
    losses, _, _ = dpo_loss(z, z, z, z, beta=0.1, loss_type="ipo")
    assert losses.item() == pytest.approx(25.0)
    # h = 2, beta = 0.5 -> (2 - 1)^2 = 1; h = 1 -> 0 (the IPO target margin)
    t = torch.tensor
    h2, _, _ = dpo_loss(t([-1.0]), t([-3.0]), t([-2.0]), t([-2.0]), beta=0.5, loss_type="ipo")
    h1, _, _ = dpo_loss(t([0.0]), t([-1.0]), z, z, beta=0.5, loss_type="ipo")
    assert h2.item() == pytest.approx(1.0) and h1.item() == pytest.approx(0.0)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-2.0], requires_grad=True)
    pr = torch.tensor([-2.0], requires_grad=True)
    losses, _, _ = dpo_loss(pc, pr, torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
    losses.sum().backward()
    # d/dh of -ln sigmoid(beta h) at 0 = -beta / 2 = -0.25
    assert pc.grad.item() == pytest.approx(-0.25) and pr.grad.item() == pytest.approx(0.25)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": 0.0},
        {"beta": 0.1, "loss_type": "hinge"},
        {"beta": 0.1, "loss_type": "ipo", "label_smoothing": 0.1},
        {"beta": 0.1, "label_smoothing": 0.5},
    ],
)
def test_dpo_rejects_bad_settings(kwargs):
    z = torch.zeros(1)
    with pytest.raises(ConfigError):
        dpo_loss(z, z, z, z, **kwargs)
