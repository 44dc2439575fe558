"""Every KL option pulls the policy toward pi_0: exact expected gradients on a categorical policy.

A one-step policy pi_theta = softmax(theta) over 6 tokens and a fixed pi_0.  For each
estimator, the *expected* gradient of the objective Kilter builds from it (the token reward
-beta * k1 fed through the policy-gradient loss; or the k2/k3 loss term) is computed exactly,
as the pi-weighted sum of per-token gradients, and compared with the gradient of the divergence
it claims to follow (kilter.ops.kl.kl_gradient_follows), near pi_0 and far from it.
"""

from __future__ import annotations

import pytest
import torch

from kilter.losses import pg_loss
from kilter.losses.ppo import kl_penalty_loss
from kilter.ops import build_token_rewards, kl_estimate
from kilter.ops.kl import kl_gradient_follows, kl_placement

V = 6
REF_LOGITS = torch.tensor([0.3, -1.0, 0.8, 0.0, -0.4, 1.2], dtype=torch.float64)


def _theta(distance: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (REF_LOGITS + distance * torch.randn(V, generator=g, dtype=torch.float64)).requires_grad_(True)


def _true_gradient(theta: torch.Tensor, divergence: str) -> torch.Tensor:
    logp = torch.log_softmax(theta, -1)
    ref = torch.log_softmax(REF_LOGITS, -1)
    if divergence == "KL(pi || pi_0)":
        value = (logp.exp() * (logp - ref)).sum()
    else:  # KL(pi_0 || pi)
        value = (ref.exp() * (ref - logp)).sum()
    (grad,) = torch.autograd.grad(value, theta)
    return grad


def _expected_penalty_gradient(theta: torch.Tensor, kind: str, placement: str, beta: float = 1.0) -> torch.Tensor:
    """E_{y ~ pi}[gradient of the per-sample loss Kilter minimises for the penalty], exactly."""
    ref = torch.log_softmax(REF_LOGITS, -1)
    probs = torch.softmax(theta, -1).detach()
    total = torch.zeros(V, dtype=torch.float64)
    mask = torch.ones(1, 1, dtype=torch.float64)
    for y in range(V):
        logp = torch.log_softmax(theta, -1)[y].reshape(1, 1)
        ref_y = ref[y].reshape(1, 1)
        if placement == "reward":
            # the trainer's path: the penalty in the token rewards (score 0), advantage = return
            k = kl_estimate(logp.detach(), ref_y, kind)
            advantage = build_token_rewards(torch.zeros(1, dtype=torch.float64), k, mask, beta)
            loss = pg_loss(logp, advantage, mask)
        else:
            loss = beta * kl_penalty_loss(logp, ref_y, mask, kind)
        (grad,) = torch.autograd.grad(loss, theta)
        total += probs[y] * grad
    return total


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


@pytest.mark.parametrize("distance", [0.05, 1.5])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_each_option_descends_the_divergence_it_claims(kind, distance):
    theta = _theta(distance)
    update = -_expected_penalty_gradient(theta, kind, kl_placement(kind))
    target = -_true_gradient(theta, kl_gradient_follows(kind))
    assert _cosine(update, target) >= 0.9
    # and it moves toward pi_0: a small step along the update lowers KL(pi || pi_0) near pi_0
    ref = torch.log_softmax(REF_LOGITS, -1)

    def kl(t):
        lp = torch.log_softmax(t, -1)
        return float((lp.exp() * (lp - ref)).sum())

    before = kl(theta.detach())
    after = kl(theta.detach() + 1e-3 * update / update.norm())
    assert after < before


@pytest.mark.parametrize("kind", ["k1", "k2"])
def test_forward_kl_options_are_exact_gradients(kind):
    """k1 in the reward and k2 as a loss follow grad KL(pi || pi_0) exactly, not only in direction."""
    theta = _theta(0.7, seed=3)
    torch.testing.assert_close(_expected_penalty_gradient(theta, kind, kl_placement(kind)),
                               _true_gradient(theta, "KL(pi || pi_0)"))


def test_k3_as_a_loss_is_the_reverse_kl_gradient_exactly():
    theta = _theta(0.7, seed=4)
    torch.testing.assert_close(_expected_penalty_gradient(theta, "k3", "loss"), _true_gradient(theta, "KL(pi_0 || pi)"))


def test_the_placements_kilter_refuses_do_not_pull_toward_pi0():
    """The defect this layout fixes: near pi_0, k3 in the reward pulls with a few percent of the KL
    gradient's strength (its expected gradient is second order) and for some policies away from
    pi_0; k1 as a loss has zero expected gradient."""
    for seed in range(4):
        theta = _theta(0.05, seed)
        bad = -_expected_penalty_gradient(theta, "k3", "reward")
        good = -_expected_penalty_gradient(theta, "k3", "loss")
        true = -_true_gradient(theta, "KL(pi || pi_0)")
        assert float(bad.norm()) < 0.05 * float(true.norm()) < float(good.norm())
    wrong_way = _theta(0.05, seed=3)
    assert _cosine(-_expected_penalty_gradient(wrong_way, "k3", "reward"), -_true_gradient(wrong_way, "KL(pi || pi_0)")) < 0
    with pytest.raises(Exception, match="zero expected gradient"):
        kl_penalty_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "k1")


def test_placement_and_claims():
    assert [kl_placement(k) for k in ("k1", "k2", "k3")] == ["reward", "loss", "loss"]
    assert kl_gradient_follows("k3") == "KL(pi_0 || pi)"


def test_kl_loss_value_by_hand_and_beta_scales_it():
    # pi(y) = 0.5, pi_0(y) = 0.25 on one token; a second token is padding
    logp = torch.log(torch.tensor([[0.5, 0.9]]))
    ref = torch.log(torch.tensor([[0.25, 0.1]]))
    mask = torch.tensor([[1.0, 0.0]])
    ln2 = torch.log(torch.tensor(2.0))
    assert float(kl_penalty_loss(logp, ref, mask, "k3")) == pytest.approx(float(ln2 - 0.5))
    assert float(kl_penalty_loss(logp, ref, mask, "k2")) == pytest.approx(float(0.5 * ln2 ** 2))
