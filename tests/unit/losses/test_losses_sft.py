import math

import pytest
import torch
import torch.nn.functional as F

from kilter.losses import causal_lm_loss, make_labels, sft_loss

LN3 = math.log(3.0)


def test_sft_loss_by_hand():
    # token 0: softmax(0, ln 3) = (1/4, 3/4), label 1 -> -ln(3/4) = ln(4/3)
    # token 1: softmax(0, 0), label 0 -> ln 2; token 2 ignored
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [5.0, -5.0]]])
    labels = torch.tensor([[1, 0, -100]])
    loss, n = sft_loss(logits, labels)
    assert n.item() == 2
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)


def test_causal_lm_loss_shifts_like_hf():
    # logits[:, t] predicts labels[:, t+1]; the last logit (garbage) and first label are dropped
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0], [100.0, -100.0]]])
    labels = torch.tensor([[-100, 1, 0]])
    loss, n = causal_lm_loss(logits, labels)
    assert n.item() == 2
    assert loss.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)


def test_sft_loss_matches_cross_entropy_mean():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=g)
    labels = torch.randint(0, 7, (3, 5), generator=g)
    labels[0, :2] = -100
    loss, n = sft_loss(logits, labels)
    assert n.item() == 13
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1)))


def test_sft_loss_all_ignored_is_zero_with_graph():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    loss, n = sft_loss(logits, torch.full((1, 3), -100))
    assert n.item() == 0 and loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_make_labels():
    ids = torch.tensor([[7, 8, 9, 0]])
    mask = torch.tensor([[0, 1, 1, 0]])
    assert make_labels(ids, mask).tolist() == [[-100, 8, 9, -100]]
