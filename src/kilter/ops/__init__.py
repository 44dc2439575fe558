"""Pure tensor functions shared by the trainers: masked statistics, log-probs, KL, advantages."""

from kilter.ops.advantages import discounted_returns, gae, grpo_advantages, rloo_advantages
from kilter.ops.kl import (
    AdaptiveKLController,
    FixedKLController,
    build_token_rewards,
    kl_estimate,
    last_token_index,
)
from kilter.ops.logprobs import entropy_from_logits, selective_log_softmax
from kilter.ops.masked import explained_variance, masked_mean, masked_sum, masked_var, masked_whiten
from kilter.ops.tokens import first_true_index, truncate_after_eos

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "build_token_rewards",
    "discounted_returns",
    "entropy_from_logits",
    "explained_variance",
    "first_true_index",
    "gae",
    "grpo_advantages",
    "kl_estimate",
    "last_token_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "rloo_advantages",
    "selective_log_softmax",
    "truncate_after_eos",
]
