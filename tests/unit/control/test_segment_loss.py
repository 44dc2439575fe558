"""The segment Bradley-Terry loss (Christiano et al. 2017, eq. 1, 10 % random answers) against hand-worked numbers."""

import math

import pytest
import torch

from kilter.losses.segments import segment_preference_loss, segment_preference_prob


def test_value_without_label_error():
    # Σr̂(σ¹) = 1, Σr̂(σ²) = 0, μ = (1, 0): loss = -log(e¹ / (e¹ + e⁰)) = log(1 + e⁻¹) = 0.313262
    loss = segment_preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), label_error=0.0)
    assert loss.item() == pytest.approx(0.313262, abs=1e-6)
    # μ = (0, 1): loss = -log(e⁰ / (e¹ + e⁰)) = log(1 + e) = 1.313262
    loss = segment_preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), label_error=0.0)
    assert loss.item() == pytest.approx(1.313262, abs=1e-6)


def test_value_with_ten_percent_label_error():
    # P = 0.9 · σ(1) + 0.05 = 0.9 · 0.731059 + 0.05 = 0.707953 -> -log P = 0.345378
    loss = segment_preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([1.0]), label_error=0.1)
    assert loss.item() == pytest.approx(0.345378, abs=1e-6)
    p = segment_preference_prob(torch.tensor([1.0]), torch.tensor([0.0]), label_error=0.1)
    assert p.item() == pytest.approx(0.707953, abs=1e-6)


def test_equal_label_and_mean_over_pairs():
    # μ = (½, ½) at d = 1: ½ (0.313262 + 1.313262) = 0.813262; mean with the μ=1 pair (0.313262) = 0.563262
    loss = segment_preference_loss(
        torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([0.5, 1.0]), label_error=0.0
    )
    assert loss.item() == pytest.approx((0.813262 + 0.313262) / 2, abs=1e-6)


def test_gradient_value_and_direction_through_per_step_rewards():
    # rewards of every step of two 3-step segments; Σ σ¹ = 0.6, Σ σ² = 0.3, μ = 1 (σ¹ preferred)
    r1 = torch.tensor([[0.1, 0.2, 0.3]], requires_grad=True)
    r2 = torch.tensor([[0.0, 0.1, 0.2]], requires_grad=True)
    loss = segment_preference_loss(r1.sum(-1), r2.sum(-1), torch.tensor([1.0]), label_error=0.0)
    loss.backward()
    expected = -(1.0 - 1.0 / (1.0 + math.exp(-0.3)))  # d/dR¹ [-log σ(R¹ - R²)] = -(1 - σ(0.3)) = -0.425557
    assert r1.grad.tolist()[0] == pytest.approx([expected] * 3, abs=1e-6)
    assert r2.grad.tolist()[0] == pytest.approx([-expected] * 3, abs=1e-6)
    # a gradient step raises the preferred segment's rewards and lowers the other's
    assert (r1.grad < 0).all() and (r2.grad > 0).all()


def test_label_error_bounds_a_confidently_wrong_prediction():
    far = torch.tensor([-100.0]), torch.tensor([100.0]), torch.tensor([1.0])
    plain = segment_preference_loss(*far, label_error=0.0)
    robust = segment_preference_loss(*far, label_error=0.1)
    assert plain.item() == pytest.approx(200.0, rel=1e-4)
    assert robust.item() == pytest.approx(-math.log(0.05), abs=1e-5)  # finite: at most -log(ε/2)
    r1 = torch.tensor([-100.0], requires_grad=True)
    segment_preference_loss(r1, far[1], far[2], label_error=0.1).backward()
    assert torch.isfinite(r1.grad).all() and r1.grad.item() <= 0.0


def test_equal_label_has_zero_gradient_at_equal_returns():
    r1 = torch.tensor([0.7], requires_grad=True)
    segment_preference_loss(r1, torch.tensor([0.7]), torch.tensor([0.5]), label_error=0.1).backward()
    assert r1.grad.item() == pytest.approx(0.0, abs=1e-7)


def test_rejects_bad_label_error():
    with pytest.raises(ValueError, match="label_error"):
        segment_preference_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), label_error=1.0)
