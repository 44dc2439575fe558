"""Advantages and returns: GAE for PPO/A2C, discounted returns, RLOO and GRPO group baselines.

All of these produce training targets, so they run without autograd: a gradient flowing
through a return into the value loss would silently change what is being optimised.
"""

from __future__ import annotations

import torch

from kilter.errors import ConfigError


def _zero_padding(x: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    return torch.where(live, x, torch.zeros((), dtype=x.dtype, device=x.device))


@torch.no_grad()
def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16).

    rewards, values, mask: (B, T) -> (advantages (B, T), returns (B, T)).

    delta_t = r_t + gamma * V_{t+1} - V_t;  A_t = delta_t + gamma * lam * A_{t+1}.
    A position whose successor is masked out is terminal: V_{t+1} = 0 and A_{t+1} = 0, so a
    right-padded response bootstraps 0 after its last real token.  Masked-out positions are
    ignored (their inputs may be garbage) and come back as 0 in both outputs; elsewhere
    returns = advantages + values (the lambda-return target of the value head).
    """
    live = mask != 0
    rewards = _zero_padding(rewards, live)
    values = _zero_padding(values, live)
    # "next is live" for every position; the last column never has a successor.
    next_live = torch.zeros_like(live)
    next_live[:, :-1] = live[:, 1:]
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = values[:, 1:]
    next_values = _zero_padding(next_values, next_live)
    deltas = rewards + gamma * next_values - values

    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * _zero_padding(running, next_live[:, t])
        advantages[:, t] = running
    advantages = _zero_padding(advantages, live)
    returns = _zero_padding(advantages + values, live)
    return advantages, returns


@torch.no_grad()
def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = sum_{k>=t} gamma^(k-t) r_k within each row's live span.

    rewards, mask: (B, T) -> (B, T), 0 where the mask is 0.  As in :func:`gae`, a masked-out
    successor ends the episode.  This is the REINFORCE return (Williams 1992).
    """
    live = mask != 0
    rewards = _zero_padding(rewards, live)
    next_live = torch.zeros_like(live)
    next_live[:, :-1] = live[:, 1:]
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * _zero_padding(running, next_live[:, t])
        returns[:, t] = running
    return _zero_padding(returns, live)


def _grouped(rewards: torch.Tensor, group_size: int, minimum: int, method: str) -> torch.Tensor:
    if group_size < minimum:
        raise ConfigError(f"{method} needs group_size >= {minimum} samples per prompt, got {group_size}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size != 0:
        raise ConfigError(
            f"{method}: {tuple(rewards.shape)} rewards do not split into groups of group_size={group_size}"
        )
    return rewards.reshape(-1, group_size)


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024).

    rewards: (N,) with the ``group_size`` samples of each prompt contiguous -> (N,).
    A_i = r_i - mean_{j != i} r_j = k / (k - 1) * (r_i - mean_j r_j): each sample's baseline
    uses only the other samples of its prompt, so it stays unbiased.
    """
    groups = _grouped(rewards, group_size, 2, "RLOO")
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others_mean).reshape(-1)


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, section 4.1.2).

    rewards: (N,) with each prompt's ``group_size`` samples contiguous -> (N,).
    A_i = (r_i - mean(group)) / (std(group) + eps), std with Bessel's correction (as in the
    common implementations).  ``scale=False`` only subtracts the group mean, which avoids
    up-weighting prompts whose rewards barely differ (Liu et al. 2025, "Dr. GRPO").
    """
    groups = _grouped(rewards, group_size, 2, "GRPO")
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)
