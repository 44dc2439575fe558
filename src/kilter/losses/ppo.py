"""Policy-gradient losses on response tokens: PPO-clip policy and value losses, plain PG."""

from __future__ import annotations

import torch

from kilter.ops.masked import masked_mean


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), averaged over real tokens.

    logp: (B, T) log-probs of the sampled tokens under the current policy (with grad);
    old_logp: (B, T) the same under the policy that sampled them; advantages: (B, T);
    mask: (B, T).  With ratio = exp(logp - old_logp) the loss is
    masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))).

    Stats (detached 0-dim tensors): ``clipfrac`` -- fraction of tokens whose clipped term is
    the one in effect (their gradient is zero); ``approx_kl`` -- the k3 estimate of
    KL(old || new), (ratio - 1) - log ratio, which is >= 0; ``ratio_mean``.
    """
    # Padding can hold arbitrary log-probs; exp of a huge gap would be inf and turn the
    # (zero) gradient at those positions into nan.
    log_ratio = torch.where(mask != 0, logp - old_logp.detach(), torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * masked_mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2)).

    values: (B, T) current value head (with grad); old_values: (B, T) at rollout time;
    returns: (B, T) targets (e.g. from :func:`kilter.ops.gae`); mask: (B, T).
    The clip keeps a single update from moving the value estimate more than ``clip_eps``
    from where it was, as in the PPO reference implementation (OpenAI baselines).
    Stats: ``clipfrac`` -- fraction of tokens where the clipped error is the larger one.
    """
    old_values = old_values.detach()
    returns = returns.detach()
    clipped_values = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_error > error).float(), mask)}
    return loss, stats


def pg_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Vanilla policy gradient (REINFORCE, Williams 1992; A2C with a critic's advantages).

    logp, advantages, mask: (B, T) -> 0-dim loss -masked_mean(logp * A); the advantages
    (or returns) are treated as constants.
    """
    return -masked_mean(logp * advantages.detach(), mask)
