"""Policy-gradient losses on response tokens: PPO-clip policy and value losses, plain PG."""

from __future__ import annotations

from typing import Literal

import torch

from kilter.errors import ConfigError
from kilter.ops.kl import KLKind, kl_estimate
from kilter.ops.masked import masked_mean, masked_sum

Aggregation = Literal["token_mean", "sequence_mean", "constant"]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token_mean",
              normaliser: float | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar, the three ways RL-for-LM papers compare.

    - ``token_mean``: sum over every real token of the batch / their number (PPO as in
      InstructGPT/TRL; a long response weighs more than a short one);
    - ``sequence_mean``: each response's token mean, then the mean over responses with at
      least one token (GRPO, Shao et al. 2024, eq. 3: 1/G sum_i 1/|o_i| sum_t);
    - ``constant``: sum over tokens / (B * ``normaliser``) with a fixed ``normaliser``, the
      generation budget (Dr. GRPO, Liu et al. 2025): no length bias in either direction.
    """
    if how == "token_mean":
        return masked_mean(per_token, mask)
    if how == "sequence_mean":
        lengths = mask.sum(-1)
        live = lengths > 0
        per_row = masked_sum(per_token, mask, dim=-1) / lengths.clamp(min=1)
        return (per_row * live).sum() / live.sum().clamp(min=1)
    if how == "constant":
        if not normaliser or normaliser <= 0:
            raise ConfigError("loss aggregation 'constant' needs a positive normaliser (the generation budget)")
        return masked_sum(per_token, mask) / (per_token.shape[0] * normaliser)
    raise ConfigError(f"loss aggregation must be token_mean, sequence_mean or constant, got {how!r}")


def aggregation_weight(mask: torch.Tensor, rows_total: int, tokens_total: float, how: Aggregation) -> float:
    """Weight of a micro-batch's aggregated loss so that micro-batches add up to the whole minibatch.

    ``mask``: (b, T) of the micro-batch; ``rows_total`` / ``tokens_total``: rows with tokens and
    real tokens of the whole minibatch.  token_mean weighs by tokens, the other two by rows.
    """
    if how == "token_mean":
        return float(mask.sum()) / max(tokens_total, 1.0)
    rows = int((mask.sum(-1) > 0).sum()) if how == "sequence_mean" else mask.shape[0]
    return rows / max(rows_total, 1)


def kl_penalty_loss(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kind: KLKind,
                    how: Aggregation = "token_mean", normaliser: float | None = None) -> torch.Tensor:
    """The KL penalty as a differentiable loss term (GRPO, Shao et al. 2024, eq. 3): aggregate(k(logp, ref)).

    logp: (B, T) current log-probs with grad; ref_logp: (B, T) of pi_0 (constant); mask: (B, T).
    Only k2 and k3 belong here (see :func:`kilter.ops.kl.kl_placement`): the expected gradient
    of k2 is grad KL(pi || pi_0), of k3 grad KL(pi_0 || pi).  The trainer adds beta times it.
    """
    if kind == "k1":
        raise ConfigError("k1 as a loss has zero expected gradient (E[grad log pi] = 0); it goes in the reward")
    per_token = kl_estimate(logp, ref_logp.detach(), kind)
    per_token = torch.where(mask != 0, per_token, torch.zeros_like(per_token))
    return aggregate(per_token, mask, how, normaliser)


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    how: Aggregation = "token_mean",
    normaliser: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective (Schulman et al. 2017, eq. 7), aggregated by :func:`aggregate`.

    logp: (B, T) log-probs of the sampled tokens under the current policy (with grad);
    old_logp: (B, T) the same under the policy that sampled them; advantages: (B, T);
    mask: (B, T).  With ratio = exp(logp - old_logp) the loss is
    aggregate(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))) (token mean by default).

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
    loss = aggregate(torch.maximum(unclipped, clipped), mask, how, normaliser)
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


def pg_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token_mean",
            normaliser: float | None = None) -> torch.Tensor:
    """Vanilla policy gradient (REINFORCE, Williams 1992; A2C with a critic's advantages).

    logp, advantages, mask: (B, T) -> 0-dim loss -aggregate(logp * A); the advantages
    (or returns) are treated as constants.
    """
    return -aggregate(logp * advantages.detach(), mask, how, normaliser)
