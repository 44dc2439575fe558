"""The reward model's zero-mean bias from the training forwards' rewards (bias_pass=last_epoch)."""

import random

import pytest
import torch

from kilter.distributed import DistInfo
from kilter.trainers.rm import LastPassRewards, RMConfig, drift_corrected_mean


def test_drift_correction_is_exact_when_every_scored_response_is_rescored():
    last = {0: 1.0, 1: 2.0, 2: 6.0}
    final = {0: 1.5, 1: 2.0, 2: 7.0}  # the weights moved after each response was scored
    assert drift_corrected_mean(last, final) == pytest.approx((1.5 + 2.0 + 7.0) / 3)
    # responses training never scored count with their final rewards
    assert drift_corrected_mean(last, final, unscored_mean=10.0, n_unscored=2) == pytest.approx(
        (1.5 + 2.0 + 7.0 + 20.0) / 5)
    assert drift_corrected_mean({}, {}, unscored_mean=3.0, n_unscored=4) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        drift_corrected_mean(last, {})


def test_a_subset_corrects_the_drift_far_better_than_the_stale_rewards():
    rng = random.Random(0)
    final = {i: rng.gauss(0.0, 1.0) for i in range(4000)}
    # scored during training with older weights: shifted by a drift of 0.8 plus a little noise
    last = {i: v - 0.8 + rng.gauss(0.0, 0.05) for i, v in final.items()}
    truth = sum(final.values()) / len(final)
    subset = {i: final[i] for i in rng.sample(sorted(final), 256)}
    estimate = drift_corrected_mean(last, subset)
    stale = sum(last.values()) / len(last)
    assert abs(stale - truth) > 0.7
    assert abs(estimate - truth) < 0.01  # the residual noise / sqrt(256) is ~0.003


def test_latest_reward_per_distinct_response_and_newest_step_wins():
    train_enc = [{"examples": [{"input_ids": [1, 2]}, {"input_ids": [1, 3]}]},
                 {"examples": [{"input_ids": [1, 3]}, {"input_ids": [4]}]}]  # [1, 3] is in both groups
    tracker = LastPassRewards(train_enc)
    assert len(tracker.ids) == 3
    tracker.add(0, [0, 1], torch.tensor([0.1, 0.2, 0.3, 0.4]))
    tracker.add(5, [1], torch.tensor([0.9, 0.8]))
    merged = tracker.merged(DistInfo())
    assert merged == {(0, 0): pytest.approx(0.1), (0, 1): pytest.approx(0.9), (1, 1): pytest.approx(0.8)}


def test_last_epoch_is_the_default_and_the_full_pass_stays_available():
    assert RMConfig().bias_pass == "last_epoch"
    assert RMConfig(bias_pass="full").bias_pass == "full"
