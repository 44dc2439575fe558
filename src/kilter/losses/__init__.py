"""Training losses: SFT, reward model (pairs and K-way rankings), DPO/IPO, KTO, PPO, context distillation."""

from kilter.losses.bradley_terry import (
    bradley_terry_loss,
    kway_bradley_terry_loss,
    pair_weights,
    pairwise_accuracy,
    ranking_pair_indices,
    ranking_pairs,
    weighted_pair_loss,
)
from kilter.losses.distill import distill_kl, teacher_topk, token_kls
from kilter.losses.dpo import dpo_loss
from kilter.losses.kto import kto_loss, kto_reference_kl, kto_reference_point
from kilter.losses.ppo import pg_loss, ppo_policy_loss, ppo_value_loss
from kilter.losses.sft import IGNORE_INDEX, causal_lm_loss, make_labels, sft_loss

__all__ = [
    "IGNORE_INDEX",
    "bradley_terry_loss",
    "causal_lm_loss",
    "distill_kl",
    "dpo_loss",
    "kto_loss",
    "kto_reference_kl",
    "kto_reference_point",
    "kway_bradley_terry_loss",
    "make_labels",
    "pair_weights",
    "pairwise_accuracy",
    "pg_loss",
    "ppo_policy_loss",
    "ppo_value_loss",
    "ranking_pair_indices",
    "ranking_pairs",
    "sft_loss",
    "teacher_topk",
    "token_kls",
    "weighted_pair_loss",
]
