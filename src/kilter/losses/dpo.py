"""Direct preference optimisation: DPO, conservative DPO and IPO."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kilter.errors import ConfigError

DPOLossType = Literal["sigmoid", "ipo"]


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and implicit rewards.

    All inputs: (N,) log-probabilities of whole responses, i.e. SUMS of per-token log-probs
    over the response tokens (prompt and padding excluded), under the policy and under the
    frozen reference.  With h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):

    - ``"sigmoid"`` (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h).  With
      ``label_smoothing`` = eps > 0 this is conservative DPO, which assumes each label is
      flipped with probability eps: (1 - eps) * -log sigmoid(beta h) + eps * -log sigmoid(-beta h).
    - ``"ipo"`` (Azar et al. 2023, empirical IPO): (h - 1 / (2 * beta))^2, which regresses
      the margin to a finite target instead of pushing it to infinity.  The IPO paper's
      experiments use length-averaged log-probs; pass means instead of sums to match them.

    Returns (losses (N,), chosen_rewards (N,), rejected_rewards (N,)); the rewards are the
    implicit ones, beta * (log pi - log ref), detached, for logging (margins, accuracy).
    """
    if beta <= 0:
        raise ConfigError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ConfigError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_log_ratio - rejected_log_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if label_smoothing > 0:
            losses = (1 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if label_smoothing > 0:
            raise ConfigError("dpo label_smoothing only applies to loss_type='sigmoid', not 'ipo'")
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ConfigError(f"dpo loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_rewards = beta * chosen_log_ratio.detach()
    rejected_rewards = beta * rejected_log_ratio.detach()
    return losses, chosen_rewards, rejected_rewards
