"""Query selection (ensemble disagreement vs random) and the label schedule."""

import gymnasium as gym
import numpy as np
import pytest
import torch

from kilter.control.queries import QueryConfig, candidate_pairs, labels_due, select_queries
from kilter.control.reward_model import RewardEnsemble, RewardModelConfig, pair_disagreement
from kilter.control.segments import Segment


def _linear_ensemble(weights: list[list[float]]) -> RewardEnsemble:
    """Members whose reward is exactly w · obs (one linear layer, hand-set; the action is ignored)."""
    obs_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
    cfg = RewardModelConfig(ensemble_size=len(weights), layers=1, hidden=1, dropout=0.0)
    ens = RewardEnsemble(obs_space, gym.spaces.Discrete(2), cfg)
    for member, w in zip(ens.members, weights, strict=True):
        hidden, out = member.net[0], member.net[-1]
        with torch.no_grad():
            hidden.weight.zero_()
            hidden.weight[0, :2] = torch.tensor(w)
            hidden.bias.fill_(10.0)  # keep the leaky ReLU in its linear part
            out.weight.fill_(1.0)
            out.bias.zero_()
    return ens


def _segment(x0: float, x1: float, uid: int) -> Segment:
    obs = np.tile(np.array([x0, x1], dtype=np.float32), (5, 1))
    return Segment(obs=obs, acts=np.zeros(5, dtype=np.int64), true_rewards=np.zeros(5), uid=uid)


def test_disagreement_ranks_the_hand_built_ambiguous_pair_first():
    # all members agree on feature 0 (weight 1); they disagree about feature 1 (-1, 0, +1)
    ens = _linear_ensemble([[1.0, -1.0], [1.0, 0.0], [1.0, 1.0]])
    segments = [
        _segment(0.5, 0.0, 0),
        _segment(-0.5, 0.0, 1),  # differ only in feature 0: everybody prefers 0
        _segment(0.0, 0.5, 2),
        _segment(0.0, -0.5, 3),  # differ only in feature 1: members split
    ]
    cfg = QueryConfig(method="active", oversample=6)
    pairs, scores = select_queries(segments, 1, cfg, ens, np.random.default_rng(0))
    assert sorted(pairs[0].tolist()) == [2, 3]
    assert scores[0] > 0.1
    # the unambiguous pair has (numerically) no disagreement
    from kilter.control.queries import as_pair_batch

    probs = ens.preference_probs(as_pair_batch(segments, np.array([[0, 1], [2, 3]])))
    assert np.allclose(probs[:, 0], probs[0, 0])
    assert probs[0, 1] < 0.5 < probs[2, 1]


def test_pair_disagreement_is_the_variance_across_members():
    probs = np.array([[0.5, 0.1], [0.5, 0.9]])
    assert pair_disagreement(probs).tolist() == pytest.approx([0.0, 0.16])


def test_random_pairs_are_distinct_and_not_repeated():
    pairs = candidate_pairs(6, 15, np.random.default_rng(1))
    assert len(pairs) == 15  # all C(6, 2)
    assert all(i != j for i, j in pairs)
    assert len({(min(i, j), max(i, j)) for i, j in pairs}) == 15
    assert len(candidate_pairs(6, 100, np.random.default_rng(1))) == 15


def test_label_schedule_asks_more_early_and_less_later():
    cfg = QueryConfig(total_labels=1000, initial_fraction=0.25, schedule="hyperbolic", schedule_scale=0.1)
    assert labels_due(0, 100_000, cfg) == 250
    assert labels_due(100_000, 100_000, cfg) == 1000
    due = [labels_due(t, 100_000, cfg) for t in range(0, 100_001, 10_000)]
    gains = np.diff(due)
    assert (gains > 0).all()
    assert (np.diff(gains) < 0).all()  # each tenth of the run gets fewer labels than the one before
    constant = QueryConfig(total_labels=1000, initial_fraction=0.0, schedule="constant")
    assert labels_due(50_000, 100_000, constant) == 500
