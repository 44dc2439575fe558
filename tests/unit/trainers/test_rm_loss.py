"""The reward-model loss on groups, collation and calibration: numbers worked by hand."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from kilter.evaluation.calibration import calibration_report, calibration_sums
from kilter.losses import (
    bradley_terry_loss,
    kway_bradley_terry_loss,
    pair_weights,
    ranking_pairs,
    weighted_pair_loss,
)
from kilter.models.reward_batches import collate_groups

LN2, LN3 = math.log(2.0), math.log(3.0)


def _pairs_tensors(pairs_per_group: list[list[tuple[int, int]]], sizes: list[int]):
    better, worse, group = [], [], []
    offset = 0
    for g, (pairs, k) in enumerate(zip(pairs_per_group, sizes)):
        for b, w in pairs:
            better.append(offset + b)
            worse.append(offset + w)
            group.append(g)
        offset += k
    return (torch.tensor(better, dtype=torch.long), torch.tensor(worse, dtype=torch.long),
            torch.tensor(group, dtype=torch.long))


def _batch_loss(rewards, better, worse, group, n_groups, margin=None, independent=None):
    """The trainer's batch loss: sum(w * l) / sum(w) with InstructGPT's per-ranking weights."""
    independent = torch.zeros(n_groups, dtype=torch.bool) if independent is None else torch.tensor(independent)
    total, weight = weighted_pair_loss(rewards, better, worse, pair_weights(group, independent), margin)
    return total / weight


def test_group_loss_by_hand():
    # group 0: K=3 equal rewards, ranks 1,2,3 -> 3 pairs of ln 2 -> mean ln 2
    # group 1: rewards (ln 3, 0), one pair -> -ln sigmoid(ln 3) = ln(4/3)
    # group 2: rewards (1, 0) with margin 1 -> -ln sigmoid(0) = ln 2
    # group 3: a tie only -> no pairs
    rewards = torch.tensor([0.0, 0.0, 0.0, LN3, 0.0, 1.0, 0.0, 5.0, 5.0])
    better, worse, group = _pairs_tensors([ranking_pairs([1, 2, 3]), [(0, 1)], [(0, 1)], []], [3, 2, 2, 2])
    margin = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])
    weights = pair_weights(group, torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0], dtype=torch.float64))
    batch_loss = _batch_loss(rewards, better, worse, group, 4, margin)
    assert batch_loss.item() == pytest.approx((LN2 + math.log(4 / 3) + LN2) / 3)


def test_independent_comparisons_of_one_prompt_weigh_one_each():
    # prompt A: three comparisons judged one by one (grouped only to forward each response once):
    #   pairs (0>1), (0>2), (1>2) on rewards (ln 3, 0, 0) -> ln(4/3), ln(4/3), ln 2
    # prompt B: one comparison on rewards (0, 0) -> ln 2
    rewards = torch.tensor([LN3, 0.0, 0.0, 0.0, 0.0])
    better, worse, group = _pairs_tensors([[(0, 1), (0, 2), (1, 2)], [(0, 1)]], [3, 2])
    per_pair = [math.log(4 / 3), math.log(4 / 3), LN2, LN2]
    independent = _batch_loss(rewards, better, worse, group, 2, independent=[True, True])
    assert independent.item() == pytest.approx(sum(per_pair) / 4)  # four comparisons, one each
    # the same pairs as one ranking of prompt A: A's three pairs share one unit (1 / C(3, 2))
    ranking = _batch_loss(rewards, better, worse, group, 2, independent=[False, False])
    assert ranking.item() == pytest.approx((sum(per_pair[:3]) / 3 + LN2) / 2)
    # gradient direction: each comparison pushes its better response up, independently weighted
    r = rewards.clone().requires_grad_(True)
    _batch_loss(r, better, worse, group, 2, independent=[True, True]).backward()
    assert r.grad[0] < 0 and r.grad[2] > 0 and r.grad[3] < 0 < r.grad[4]


def test_kway_equals_the_mean_over_explicitly_enumerated_pairs():
    gen = random.Random(0)
    for _ in range(20):
        sizes = [gen.randint(2, 7) for _ in range(gen.randint(1, 5))]
        ranks = [[gen.randint(1, k) for _ in range(k)] for k in sizes]
        rewards = torch.randn(sum(sizes), dtype=torch.float64)
        strengths = [[gen.choice([None, 0.25, 1.0]) for _ in ranking_pairs(r)] for r in ranks]
        pairs = [ranking_pairs(r) for r in ranks]
        better, worse, group = _pairs_tensors(pairs, sizes)
        margin = torch.tensor([0.5 * (s or 0.0) for ss in strengths for s in ss], dtype=torch.float64)
        got = (_batch_loss(rewards, better, worse, group, len(sizes), margin) if len(better)
               else torch.tensor(0.0))
        # Explicit: for every prompt, every pair, one at a time.
        per_prompt, offset = [], 0
        for k, p, ss in zip(sizes, pairs, strengths):
            terms = [-math.log(1 / (1 + math.exp(-(float(rewards[offset + b] - rewards[offset + w]) - 0.5 * (s or 0.0)))))
                     for (b, w), s in zip(p, ss)]
            if terms:
                per_prompt.append(sum(terms) / len(terms))
            offset += k
        expected = sum(per_prompt) / len(per_prompt) if per_prompt else 0.0
        assert got.item() == pytest.approx(expected, abs=1e-6)


def test_agrees_with_the_library_losses():
    rewards = torch.randn(10, dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    ranks = torch.tensor([1, 3, 2, 2, 1, 2, 3, 1, 1, 2])
    ranks_per = [[1, 3, 2, 2], [1, 2, 3], [1, 1, 2]]
    better, worse, group = _pairs_tensors([ranking_pairs(r) for r in ranks_per], [4, 3, 3])
    expected = kway_bradley_terry_loss(rewards, groups, ranks)
    assert _batch_loss(rewards, better, worse, group, 3).item() == pytest.approx(expected.item(), abs=1e-12)
    # K = 2 groups with margins: the plain pairwise loss.
    rc, rr, m = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    flat = torch.stack([rc, rr], 1).flatten()
    got = _batch_loss(flat, torch.arange(0, 10, 2), torch.arange(1, 10, 2), torch.arange(5), 5, m)
    assert got.item() == pytest.approx(bradley_terry_loss(rc, rr, m).item(), abs=1e-12)


def test_gradient_flows_once_per_response():
    # A response in three pairs gets the sum of its three pair gradients (divided by 3 pairs).
    rewards = torch.zeros(3, requires_grad=True)
    _batch_loss(rewards, torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2]), torch.tensor([0, 0, 0]), 1).backward()
    # d/dr of -ln sigmoid(d) at d = 0 is -0.5 for the better side and +0.5 for the worse.
    torch.testing.assert_close(rewards.grad, torch.tensor([-1.0, 0.0, 1.0]) / 3)


def test_collate_groups_flattens_each_response_once():
    groups = [
        {"examples": [{"input_ids": [5, 6, 1]}, {"input_ids": [5, 1]}, {"input_ids": [5, 7, 7, 1]}],
         "pairs": [(0, 1, None), (2, 1, 0.5), (0, 2, None)]},
        {"examples": [{"input_ids": [8, 1]}, {"input_ids": [9, 9, 1]}], "pairs": [(1, 0, 1.0)]},
    ]
    batch = collate_groups(groups, pad_id=0, margin_scale=2.0)
    assert batch["input_ids"].shape == (5, 4)  # 3 + 2 responses, not 2 x 4 pairs
    assert batch["input_ids"][3].tolist() == [8, 1, 0, 0] and batch["attention_mask"][3].tolist() == [1, 1, 0, 0]
    assert batch["better"].tolist() == [0, 2, 0, 4]
    assert batch["worse"].tolist() == [1, 1, 2, 3]
    assert batch["pair_group"].tolist() == [0, 0, 0, 1]
    assert batch["margin"].tolist() == [0.0, 1.0, 0.0, 2.0]  # 2 x strength, 0 without one
    assert int(batch["n_groups"]) == 2


def test_calibration_by_hand():
    # p(chosen) = 0.93 and 0.64; each pair also enters as (0.07, lost) and (0.36, lost).
    # (Values off the bin edges: 0.9 in float32 is 0.8999999..., which belongs to bin 8.)
    sums = calibration_sums(torch.tensor([0.93, 0.64]), 10)
    assert sums[0].tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    report = calibration_report(sums)
    # (|0.93 - 1| + |0.64 - 1| + |0.07 - 0| + |0.36 - 0|) / 4 = 0.86 / 4 = 0.215
    assert report["ece"] == pytest.approx(0.215, abs=1e-6)
    assert report["n_pairs"] == 2
    top = report["bins"][9]
    assert (top["lo"], top["hi"], top["count"]) == (0.9, 1.0, 1)
    assert top["mean_predicted"] == pytest.approx(0.93) and top["observed"] == 1.0
    assert report["bins"][3]["observed"] == 0.0
    assert report["bins"][1]["count"] == 0 and report["bins"][1]["observed"] is None
    # A model that says 0.5 for everything is perfectly calibrated on average: observed 0.5.
    flat = calibration_report(calibration_sums(torch.full((4,), 0.5), 4))
    assert flat["ece"] == pytest.approx(0.0) and flat["bins"][2]["count"] == 8
    # p = 1.0 lands in the last (closed) bin.
    assert calibration_sums(torch.tensor([1.0]), 5)[0].tolist() == [1, 0, 0, 0, 1]


def test_probability_from_sigmoid_of_the_gap():
    gap = torch.tensor([LN3])
    assert torch.sigmoid(gap).item() == pytest.approx(0.75)
    assert (-F.logsigmoid(gap)).item() == pytest.approx(math.log(4 / 3))
