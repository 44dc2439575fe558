"""KTO's data pieces: default class weights, mismatched partners for z0, the reward AUC."""

from __future__ import annotations

import math

import pytest
import torch

from kilter.trainers.kto import class_weights, mismatched_partners, reward_auc


def test_class_weights_balance_counts_by_default():
    assert class_weights(300, 100) == (1.0, 3.0)
    assert class_weights(100, 300) == (3.0, 1.0)
    assert class_weights(50, 50) == (1.0, 1.0)
    # the paper's ratio lambda_D n_D / (lambda_U n_U) is exactly 1 with the defaults
    wd, wu = class_weights(70, 30)
    assert wd * 70 / (wu * 30) == pytest.approx(1.0)
    assert class_weights(10, 0) == (1.0, 1.0)
    # a weight the user sets is kept; the other defaults to 1
    assert class_weights(300, 100, desirable=1.33) == (1.33, 1.0)
    assert class_weights(300, 100, undesirable=2.0) == (1.0, 2.0)


def test_mismatched_partners_use_other_prompts_and_are_seeded():
    prompts = ["a", "a", "b", "b", "c", "a", "c", "b"]
    partners = mismatched_partners(prompts, seed=0)
    assert len(partners) == len(prompts)
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partners))
    assert partners == mismatched_partners(prompts, seed=0)
    assert partners != mismatched_partners(prompts, seed=1) or partners != mismatched_partners(prompts, seed=2)
    # with a single prompt there is no other prompt: the neighbour is used (never itself when n > 1)
    same = mismatched_partners(["x", "x", "x"], seed=0)
    assert all(j != i for i, j in enumerate(same))


def test_reward_auc_by_hand():
    labels = torch.tensor([True, False, False])
    assert reward_auc(torch.tensor([3.0, 1.0, 2.0]), labels) == 1.0
    assert reward_auc(torch.tensor([1.0, 3.0, 2.0]), labels) == 0.0
    assert reward_auc(torch.tensor([2.0, 3.0, 1.0]), labels) == 0.5  # beats one of two
    assert reward_auc(torch.zeros(3), labels) == 0.5  # all ties: chance
    assert math.isnan(reward_auc(torch.ones(2), torch.tensor([True, True])))
