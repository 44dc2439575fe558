"""The learned reward r̂(s, a): an ensemble of small networks (Christiano et al. 2017, section 2.2).

* Observations that are vectors get an MLP over [obs, action]; pixel observations (uint8,
  channel-first stacks such as Atari's 4x84x84) get a small CNN whose features are joined
  with the action before the last layers.  Discrete actions are one-hot encoded.
* Each member trains on a bootstrap resample of the labeled pairs (same size as the data,
  drawn with replacement) with the segment Bradley-Terry loss of
  :func:`kilter.losses.segments.segment_preference_loss`, including the assumed 10 % of
  random answers.  A fraction of the pairs is held out for validation; like the paper, the
  L2 coefficient is adapted so that the validation loss stays between 1.1 and 1.5 times the
  training loss, and the networks use dropout.
* Each member's output is standardised on recent steps (zero mean, unit std) before the
  members are averaged, so no member dominates the reward the agent sees.
* Disagreement (for active queries) is the variance across members of P̂[σ¹ ≻ σ²].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from pydantic import Field
from torch import nn

from kilter.config import BaseConfig
from kilter.control.envs import is_image_obs
from kilter.losses.segments import segment_preference_loss, segment_preference_prob


class RewardModelConfig(BaseConfig):
    """The reward-model ensemble and how it is trained each round."""

    ensemble_size: int = Field(3, gt=0)
    """Number of networks; their disagreement chooses active queries (the paper used 3)."""
    hidden: int = Field(64, gt=0)
    """Width of the hidden layers (MLP) or of the layer after the convolutions (CNN)."""
    layers: int = Field(2, gt=0)
    """Hidden layers of the MLP."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout after every hidden layer while training."""
    l2: float = Field(1e-4, ge=0.0)
    """Initial L2 coefficient on the weights (adaptive_l2 keeps validation/training loss in [1.1, 1.5])."""
    adaptive_l2: bool = True
    """Adapt the L2 coefficient from the validation/training loss ratio, as in the paper."""
    lr: float = Field(1e-3, gt=0.0)
    """Adam learning rate."""
    batch_size: int = Field(32, gt=0)
    """Pairs per optimizer step."""
    epochs: int = Field(3, gt=0)
    """Passes over each member's bootstrap resample per round."""
    label_error: float = Field(0.1, ge=0.0, lt=1.0)
    """Assumed fraction of uniformly random answers (section 2.2.3 of the paper: 0.1)."""
    val_fraction: float = Field(1 / math.e, ge=0.0, lt=1.0)
    """Fraction of labeled pairs held out for validation (the paper: 1/e)."""


def action_dim(space: gym.Space) -> int:
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    if isinstance(space, (gym.spaces.Box, gym.spaces.MultiBinary)):
        return int(np.prod(space.shape))
    raise ValueError(f"unsupported action space {space}")


def encode_actions(acts: torch.Tensor, space: gym.Space) -> torch.Tensor:
    """(N, *act_shape) actions -> (N, A) float features (one-hot for Discrete)."""
    if isinstance(space, gym.spaces.Discrete):
        return nn.functional.one_hot(acts.long().reshape(-1) - int(space.start), int(space.n)).float()
    return acts.reshape(acts.shape[0], -1).float()


class MLPReward(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int, layers: int, dropout: float):
        super().__init__()
        mods: list[nn.Module] = []
        width = obs_dim + act_dim
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.LeakyReLU(0.01), nn.Dropout(dropout)]
            width = hidden
        mods.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """obs (N, obs_dim) float, act (N, A) -> (N,) rewards."""
        return self.net(torch.cat([obs.reshape(obs.shape[0], -1).float(), act], dim=-1)).squeeze(-1)


class CNNReward(nn.Module):
    """Pixels (N, C, H, W) uint8 scaled to [0, 1]; two strided convolutions, then [features, action] -> MLP."""

    def __init__(self, obs_shape: tuple[int, ...], act_dim: int, hidden: int, dropout: float):
        super().__init__()
        channels = obs_shape[0] if len(obs_shape) == 3 else 1
        self.conv = nn.Sequential(
            nn.Conv2d(channels, 16, 8, stride=4),
            nn.LeakyReLU(0.01),
            nn.Dropout(dropout),
            nn.Conv2d(16, 16, 4, stride=2),
            nn.LeakyReLU(0.01),
            nn.Dropout(dropout),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_feat = self.conv(torch.zeros(1, channels, *obs_shape[-2:])).shape[-1]
        self.head = nn.Sequential(nn.Linear(n_feat + act_dim, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, 1))

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        x = obs.float() / 255.0
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(torch.cat([self.conv(x), act], dim=-1)).squeeze(-1)


@dataclass
class PairBatch:
    """Labeled segment pairs as tensors: obs (P, T, *obs), acts (P, T, *act), mu (P,) = P(first is better)."""

    obs_1: np.ndarray
    acts_1: np.ndarray
    obs_2: np.ndarray
    acts_2: np.ndarray
    mu: np.ndarray

    def __len__(self) -> int:
        return len(self.mu)

    def take(self, idx: np.ndarray) -> PairBatch:
        return PairBatch(self.obs_1[idx], self.acts_1[idx], self.obs_2[idx], self.acts_2[idx], self.mu[idx])


class RewardEnsemble(nn.Module):
    """K reward networks over (observation, action) with per-member output standardisation."""

    def __init__(self, obs_space: gym.Space, act_space: gym.Space, cfg: RewardModelConfig):
        super().__init__()
        self.cfg = cfg
        self.obs_space, self.act_space = obs_space, act_space
        a_dim = action_dim(act_space)

        def make() -> nn.Module:
            if is_image_obs(obs_space):
                return CNNReward(tuple(obs_space.shape), a_dim, cfg.hidden, cfg.dropout)
            return MLPReward(int(np.prod(obs_space.shape)), a_dim, cfg.hidden, cfg.layers, cfg.dropout)

        self.members = nn.ModuleList([make() for _ in range(cfg.ensemble_size)])
        # per-member standardisation of the output, fitted on recent steps after each round
        self.register_buffer("out_mean", torch.zeros(cfg.ensemble_size))
        self.register_buffer("out_std", torch.ones(cfg.ensemble_size))
        self.register_buffer("l2", torch.tensor(float(cfg.l2)))
        self.optimizers = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in self.members]

    # ------------------------------------------------------------------ prediction
    def member_rewards(self, obs: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """obs (N, *obs), acts (N, *act) -> (K, N) raw per-member rewards (grad flows in train mode)."""
        a = encode_actions(acts, self.act_space)
        return torch.stack([m(obs, a) for m in self.members])

    @torch.no_grad()
    def reward(self, obs: np.ndarray, acts: np.ndarray) -> np.ndarray:
        """The reward the agent is trained on: mean of the standardised members, (N,) float32."""
        self.eval()
        raw = self.member_rewards(torch.as_tensor(obs), torch.as_tensor(acts))
        return ((raw - self.out_mean[:, None]) / self.out_std[:, None]).mean(0).numpy().astype(np.float32)

    def segment_returns(self, obs: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
        """obs (P, T, *obs), acts (P, T, *act) -> (K, P) Σ_t r̂ per member (raw outputs)."""
        p, t = obs.shape[:2]
        flat = self.member_rewards(obs.reshape(p * t, *obs.shape[2:]), acts.reshape(p * t, *acts.shape[2:]))
        return flat.reshape(-1, p, t).sum(-1)

    @torch.no_grad()
    def preference_probs(self, batch: PairBatch, chunk: int = 256) -> np.ndarray:
        """(K, P) each member's P̂[σ¹ ≻ σ²] (no label-error smoothing), in eval mode."""
        self.eval()
        out = []
        for lo in range(0, len(batch), chunk):
            part = batch.take(np.arange(lo, min(lo + chunk, len(batch))))
            r1 = self.segment_returns(torch.as_tensor(part.obs_1), torch.as_tensor(part.acts_1))
            r2 = self.segment_returns(torch.as_tensor(part.obs_2), torch.as_tensor(part.acts_2))
            out.append(segment_preference_prob(r1, r2).numpy())
        return np.concatenate(out, axis=1) if out else np.zeros((len(self.members), 0))

    def disagreement(self, batch: PairBatch) -> np.ndarray:
        """(P,) variance across members of P̂[σ¹ ≻ σ²]: the active-query score."""
        return pair_disagreement(self.preference_probs(batch))

    @torch.no_grad()
    def fit_output_scale(self, obs: np.ndarray, acts: np.ndarray) -> None:
        """Standardise every member's output on these steps (N, *obs), (N, *act)."""
        self.eval()
        raw = self.member_rewards(torch.as_tensor(obs), torch.as_tensor(acts))
        self.out_mean.copy_(raw.mean(1))
        self.out_std.copy_(raw.std(1).clamp_min(1e-6))

    # ------------------------------------------------------------------ training
    def _loss(self, member: int, batch: PairBatch, train: bool) -> torch.Tensor:
        model = self.members[member]
        model.train(train)
        a_space = self.act_space
        p, t = batch.obs_1.shape[:2]

        def returns(obs: np.ndarray, acts: np.ndarray) -> torch.Tensor:
            o = torch.as_tensor(obs).reshape(p * t, *obs.shape[2:])
            a = encode_actions(torch.as_tensor(acts).reshape(p * t, *acts.shape[2:]), a_space)
            return model(o, a).reshape(p, t).sum(-1)

        r1, r2 = returns(batch.obs_1, batch.acts_1), returns(batch.obs_2, batch.acts_2)
        return segment_preference_loss(r1, r2, torch.as_tensor(batch.mu), self.cfg.label_error)

    def _l2_penalty(self, member: int) -> torch.Tensor:
        weights = [p for name, p in self.members[member].named_parameters() if name.endswith("weight")]
        return self.l2 * sum((w * w).sum() for w in weights)

    def train_round(self, data: PairBatch, rng: np.random.Generator) -> dict[str, float]:
        """Train every member on a bootstrap resample of the training split; return namespaced metrics."""
        n = len(data)
        order = rng.permutation(n)
        n_val = round(n * self.cfg.val_fraction) if n >= 4 else 0
        val, train = data.take(order[:n_val]), data.take(order[n_val:])
        bs = self.cfg.batch_size
        train_losses, val_losses, accs = [], [], []
        for k, opt in enumerate(self.optimizers):
            boot = train.take(rng.integers(0, len(train), size=len(train)))
            for _ in range(self.cfg.epochs):
                perm = rng.permutation(len(boot))
                for lo in range(0, len(boot), bs):
                    part = boot.take(perm[lo : lo + bs])
                    loss = self._loss(k, part, train=True) + self._l2_penalty(k)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                train_losses.append(float(self._loss(k, train, train=False)))
                if n_val:
                    val_losses.append(float(self._loss(k, val, train=False)))
        metrics = {"rm/loss_train": float(np.mean(train_losses)), "rm/l2": float(self.l2)}
        if val_losses:
            metrics["rm/loss_val"] = float(np.mean(val_losses))
            probs = self.preference_probs(val).mean(0)
            decided = val.mu != 0.5
            if decided.any():
                accs = ((probs[decided] > 0.5) == (val.mu[decided] > 0.5)).mean()
                metrics["rm/acc_val"] = float(accs)
            if self.cfg.adaptive_l2:
                ratio = metrics["rm/loss_val"] / max(metrics["rm/loss_train"], 1e-8)
                if ratio > 1.5:
                    self.l2.mul_(1.5)
                elif ratio < 1.1:
                    self.l2.div_(1.5)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def full_state(self) -> dict:
        return {"model": self.state_dict(), "optimizers": [o.state_dict() for o in self.optimizers]}

    def load_full_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


def pair_disagreement(probs: np.ndarray) -> np.ndarray:
    """(K, P) members' preference probabilities -> (P,) variance across members (population variance)."""
    return np.asarray(probs).var(axis=0)
