import math

import pytest
import torch

from kilter.losses import pg_loss, ppo_policy_loss, ppo_value_loss


def test_ppo_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.7 (old_logp 0); advantages 1, 1, -1, -1; eps 0.2; 5th token is padding
    ratios = [1.5, 0.5, 1.1, 0.7, 50.0]
    logp = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 5)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # token 1: max(-1.5, -1.2) = -1.2  (clipped term in effect)
    # token 2: max(-0.5, -0.8) = -0.5
    # token 3: max( 1.1,  1.1) =  1.1
    # token 4: max( 0.7,  0.8) =  0.8  (clipped term in effect)
    # mean (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.7) / 4)
    k3 = [(r - 1) - math.log(r) for r in ratios[:4]]  # 0.0945, 0.1931, 0.0047, 0.0567
    assert stats["approx_kl"].item() == pytest.approx(sum(k3) / 4, abs=1e-6)
    loss.backward()
    # clipped tokens get no gradient; others d/dlogp (-A * ratio) / 4: -0.5/4, +1.1/4
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.125, 0.275, 0.0, 0.0]]), atol=1e-6)


def test_ppo_policy_loss_on_policy_equals_pg():
    # ratio 1 everywhere: no clipping, loss = -mean(A), approx_kl 0
    logp = torch.tensor([[-1.0, -2.0, -0.3]])
    adv = torch.tensor([[1.0, -3.0, 0.5]])
    loss, stats = ppo_policy_loss(logp, logp.clone(), adv, torch.ones(1, 3), clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 3.0 + 0.5) / 3)
    assert stats["clipfrac"].item() == 0.0 and stats["approx_kl"].item() == 0.0


def test_ppo_policy_loss_padding_with_extreme_logps_keeps_grad_finite():
    logp = torch.tensor([[-1.0, 500.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -500.0]])
    loss, stats = ppo_policy_loss(logp, old, torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 0]]), clip_eps=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert torch.isfinite(logp.grad).all() and math.isfinite(stats["approx_kl"].item())


def test_ppo_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 1.0, 123.0]], requires_grad=True)
    old = torch.tensor([[0.5, 2.0, 0.5, 0.0]])
    returns = torch.tensor([[0.0, 3.0, 2.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 1: (1 - 0)^2 = 1 vs clipped 0.7: 0.49 -> 1
    # token 2: (2 - 3)^2 = 1 vs clipped 2: 1     -> 1
    # token 3: (1 - 2)^2 = 1 vs clipped 0.7: 1.69 -> 1.69 (clipped larger)
    # 0.5 * (1 + 1 + 1.69) / 3 = 0.615
    assert loss.item() == pytest.approx(0.615, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    loss.backward()
    # token 1: 0.5 * 2 * (1 - 0) / 3; token 2: 0.5 * 2 * (2 - 3) / 3; token 3 clipped -> 0
    assert torch.allclose(values.grad, torch.tensor([[1 / 3, -1 / 3, 0.0, 0.0]]), atol=1e-6)


def test_pg_loss_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -5.0]], requires_grad=True)
    adv = torch.tensor([[2.0, 1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    # -mean(-1 * 2, -2 * 1) = 2
    loss = pg_loss(logp, adv, mask)
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -0.5, 0.0]]))



def test_aggregations_by_hand():
    from kilter.losses.ppo import aggregate, aggregation_weight

    x = torch.tensor([[1.0, 3.0, 0.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the last row is empty
    assert float(aggregate(x, mask, "token_mean")) == pytest.approx((1 + 3 + 4) / 3)
    assert float(aggregate(x, mask, "sequence_mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(x, mask, "constant", normaliser=4.0)) == pytest.approx((1 + 3 + 4) / (3 * 4))
    # micro-batch weights: tokens for token_mean, live rows for sequence_mean, rows for constant
    assert aggregation_weight(mask[:1], 2, 3.0, "token_mean") == pytest.approx(2 / 3)
    assert aggregation_weight(mask[:1], 2, 3.0, "sequence_mean") == pytest.approx(1 / 2)
    assert aggregation_weight(mask[:1], 3, 3.0, "constant") == pytest.approx(1 / 3)
    # gradient direction: sequence_mean weighs the short response's token more than token_mean does
    w = x.clone().requires_grad_(True)
    aggregate(w, mask, "sequence_mean").backward()
    assert w.grad[1, 0] == pytest.approx(0.5) and w.grad[0, 0] == pytest.approx(0.25)
    with pytest.raises(Exception, match="normaliser"):
        aggregate(x, mask, "constant")
