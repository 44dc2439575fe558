import math
import random

import pytest
import torch
import torch.nn.functional as F

from kilter.losses import (
    bradley_terry_loss,
    kway_bradley_terry_loss,
    pairwise_accuracy,
    ranking_pair_indices,
    ranking_pairs,
)

LN2, LN3 = math.log(2.0), math.log(3.0)


def test_bradley_terry_by_hand():
    # diff 0 -> -ln sigmoid(0) = ln 2; diff -ln 3 -> -ln(1/4) = ln 4; mean = 1.5 ln 2
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([2.0, LN3]))
    assert loss.item() == pytest.approx(1.5 * LN2)
    # margin: diff 1 - 0 - 1 = 0 -> ln 2
    with_margin = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(LN2)


def test_bradley_terry_gradient_separates_pair():
    rc = torch.tensor([0.0], requires_grad=True)
    rr = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(rc, rr).backward()
    # d/d diff of -ln sigmoid(diff) at 0 = -(1 - 1/2) = -0.5
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)


def test_pairwise_accuracy_ties_count_half():
    # win, tie, loss -> (1 + 0.5 + 0) / 3
    acc = pairwise_accuracy(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 5.0]))
    assert acc.item() == pytest.approx(0.5)


def test_ranking_pairs():
    assert ranking_pairs([2, 1, 3]) == [(1, 0), (0, 2), (1, 2)]
    assert ranking_pairs([1, 1, 2]) == [(0, 2), (1, 2)]
    assert ranking_pairs([4, 4]) == []
    assert len(ranking_pairs([1, 2, 3, 4, 5])) == 10  # C(5, 2)


def test_ranking_pair_indices_match_python_pairs():
    group = torch.tensor([5, 5, 5, 9, 9])
    ranks = torch.tensor([2, 1, 3, 1, 1])
    better, worse = ranking_pair_indices(group, ranks)
    assert sorted(zip(better.tolist(), worse.tolist())) == sorted([(1, 0), (0, 2), (1, 2)])


def test_kway_by_hand_normalises_per_prompt():
    # prompt 7: K=3 equal rewards, ranks 1,2,3 -> 3 pairs of ln 2 -> mean ln 2
    # prompt 3: rewards (ln 3, 0), ranks 1,2 -> -ln sigmoid(ln 3) = ln(4/3)
    # prompt 4: a tie only -> no pairs, excluded
    rewards = torch.tensor([0.0, 0.0, 0.0, LN3, 0.0, 1.0, 2.0])
    group = torch.tensor([7, 7, 7, 3, 3, 4, 4])
    ranks = torch.tensor([1, 2, 3, 1, 2, 1, 1])
    loss = kway_bradley_terry_loss(rewards, group, ranks)
    assert loss.item() == pytest.approx((LN2 + math.log(4 / 3)) / 2)
    # (a flat mean over all 4 pairs would give (3 ln 2 + ln 4/3) / 4 instead)


def test_kway_equals_explicit_enumeration_random():
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rewards, groups, ranks = [], [], []
        for prompt in range(rng.randint(1, 4)):
            k = rng.randint(2, 5)
            groups += [prompt] * k
            ranks += [rng.randint(1, k) for _ in range(k)]  # ties happen
        rewards = torch.randn(len(ranks), generator=g, dtype=torch.float64)
        per_prompt = []
        start = 0
        for prompt in sorted(set(groups)):
            k = groups.count(prompt)
            pairs = ranking_pairs(ranks[start : start + k])
            if pairs:
                losses = [-F.logsigmoid(rewards[start + b] - rewards[start + w]) for b, w in pairs]
                per_prompt.append(torch.stack(losses).mean())
            start += k
        expected = torch.stack(per_prompt).mean() if per_prompt else torch.tensor(0.0, dtype=torch.float64)
        loss = kway_bradley_terry_loss(rewards, torch.tensor(groups), torch.tensor(ranks))
        assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_kway_with_k2_equals_pairwise_loss():
    rc = torch.tensor([0.3, -1.0, 2.0])
    rr = torch.tensor([0.1, 0.5, 2.5])
    rewards = torch.stack([rc, rr], 1).reshape(-1)  # c0 r0 c1 r1 ...
    group = torch.arange(3).repeat_interleave(2)
    ranks = torch.tensor([1, 2]).repeat(3)
    kway = kway_bradley_terry_loss(rewards, group, ranks)
    assert kway.item() == pytest.approx(bradley_terry_loss(rc, rr).item())


def test_kway_no_pairs_is_zero_with_graph():
    rewards = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = kway_bradley_terry_loss(rewards, torch.tensor([0, 0]), torch.tensor([1, 1]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(rewards.grad == 0)
