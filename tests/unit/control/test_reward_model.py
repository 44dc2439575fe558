"""The reward-model ensemble: learns a preference from labeled pairs; CNN for pixels; output standardisation."""

import gymnasium as gym
import numpy as np
import torch

from kilter.control.reward_model import CNNReward, PairBatch, RewardEnsemble, RewardModelConfig


def _pairs(n: int, rng: np.random.Generator) -> PairBatch:
    """Segments of 4 steps of 3-d observations; the true reward is obs[0], so μ = 1 when Σobs[0] is larger."""
    o1 = rng.normal(size=(n, 4, 3)).astype(np.float32)
    o2 = rng.normal(size=(n, 4, 3)).astype(np.float32)
    a = rng.integers(0, 2, size=(n, 4))
    mu = (o1[..., 0].sum(1) > o2[..., 0].sum(1)).astype(np.float32)
    return PairBatch(o1, a, o2, a.copy(), mu)


def test_ensemble_learns_the_preference_and_its_reward_tracks_the_true_one():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    space = gym.spaces.Box(-5, 5, shape=(3,), dtype=np.float32)
    cfg = RewardModelConfig(ensemble_size=2, hidden=32, epochs=8, lr=3e-3)
    ens = RewardEnsemble(space, gym.spaces.Discrete(2), cfg)
    data = _pairs(300, rng)
    before = [p.detach().clone() for p in ens.parameters()]
    metrics = ens.train_round(data, rng)
    assert metrics["rm/acc_val"] > 0.85
    assert metrics["rm/loss_val"] < 0.6  # chance is log 2 = 0.69 (and the 10 % error floor keeps it above ~0.2)
    assert any(not torch.equal(a, b) for a, b in zip(before, ens.parameters(), strict=True))
    # per-step reward ranks states by the hidden true reward obs[0]
    obs = rng.normal(size=(500, 3)).astype(np.float32)
    acts = rng.integers(0, 2, size=500)
    ens.fit_output_scale(obs, acts)
    r = ens.reward(obs, acts)
    assert abs(r.mean()) < 0.05 and abs(r.std() - 1) < 0.35  # members standardised before averaging
    assert np.corrcoef(r, obs[:, 0])[0, 1] > 0.9


def test_adaptive_l2_moves_with_the_validation_ratio():
    rng = np.random.default_rng(1)
    space = gym.spaces.Box(-5, 5, shape=(3,), dtype=np.float32)
    ens = RewardEnsemble(
        space, gym.spaces.Discrete(2), RewardModelConfig(ensemble_size=1, epochs=30, l2=1e-4, dropout=0.0)
    )
    start = float(ens.l2)
    m = ens.train_round(_pairs(20, rng), rng)  # 13 training pairs, 30 epochs: overfits
    ratio = m["rm/loss_val"] / m["rm/loss_train"]
    assert (float(ens.l2) > start) == (ratio > 1.5)
    assert (float(ens.l2) < start) == (ratio < 1.1)


def test_cnn_reward_over_stacked_pixels_and_continuous_actions():
    obs_space = gym.spaces.Box(0, 255, shape=(4, 84, 84), dtype=np.uint8)
    act_space = gym.spaces.Box(-1, 1, shape=(2,), dtype=np.float32)
    ens = RewardEnsemble(obs_space, act_space, RewardModelConfig(ensemble_size=2))
    assert all(isinstance(m, CNNReward) for m in ens.members)
    obs = np.random.default_rng(0).integers(0, 255, size=(3, 4, 84, 84), dtype=np.uint8)
    r = ens.reward(obs, np.zeros((3, 2), np.float32))
    assert r.shape == (3,) and np.isfinite(r).all()
    batch = PairBatch(
        obs[None, :2],
        np.zeros((1, 2, 2), np.float32),
        obs[None, 1:],
        np.zeros((1, 2, 2), np.float32),
        np.ones(1, np.float32),
    )
    assert ens.preference_probs(batch).shape == (2, 1)


def test_full_state_round_trip():
    space = gym.spaces.Box(-5, 5, shape=(3,), dtype=np.float32)
    cfg = RewardModelConfig(ensemble_size=2)
    a = RewardEnsemble(space, gym.spaces.Discrete(2), cfg)
    rng = np.random.default_rng(2)
    a.train_round(_pairs(30, rng), rng)
    b = RewardEnsemble(space, gym.spaces.Discrete(2), cfg)
    b.load_full_state(a.full_state())
    obs = rng.normal(size=(10, 3)).astype(np.float32)
    acts = np.zeros(10, np.int64)
    assert np.array_equal(a.reward(obs, acts), b.reward(obs, acts))
    assert b.optimizers[0].state_dict()["state"]  # Adam moments came along
