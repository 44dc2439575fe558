"""Kahneman-Tversky optimisation: learning from thumbs up / thumbs down (Ethayarajh et al. 2024)."""

from __future__ import annotations

import torch


def kto_reference_kl(
    policy_logps_mismatched: torch.Tensor, ref_logps_mismatched: torch.Tensor
) -> torch.Tensor:
    """The reference point z0: a batch estimate of KL(pi || ref), detached and clamped at 0.

    policy_logps_mismatched, ref_logps_mismatched: (M,) summed log-probs of responses paired
    with *other* prompts of the batch (y' for x), so the estimate does not depend on how
    good the matched responses are.  Returns a 0-dim tensor.  Under data parallelism, average
    the per-rank value across ranks before use.
    """
    gap = (policy_logps_mismatched - ref_logps_mismatched).detach()
    return kto_reference_point(float(gap.sum()), gap.numel())


def kto_reference_point(kl_sum: float, count: float) -> torch.Tensor:
    """z0 from the sum of log pi - log ref over ``count`` mismatched responses: max(0, sum / count).

    The form a data-parallel trainer uses: each process sums its share, the sums and counts are
    added across processes, then divided.  No responses (``count`` 0): 0.  Worked: (3.0, 4) -> 0.75,
    (-1.0, 2) -> 0.
    """
    if count <= 0:
        return torch.tensor(0.0)
    return torch.tensor(max(0.0, kl_sum / count))


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_ref: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example KTO losses (Ethayarajh et al. 2024, eq. 8).

    policy_logps, ref_logps: (N,) summed response log-probs; labels: (N,) bool, True for a
    desirable (thumbs-up) response; kl_ref: 0-dim reference point z0 (see
    :func:`kto_reference_kl`; it is detached and clamped >= 0 here as well).
    With r = log pi(y|x) - log ref(y|x):
    desirable: w_d * (1 - sigmoid(beta * (r - z0))); undesirable: w_u * (1 - sigmoid(beta * (z0 - r))).
    The paper suggests choosing the weights so that w_d * n_d / (w_u * n_u) lies in [1, 4/3].

    Returns (losses (N,), rewards (N,) = beta * r, detached, for logging).
    """
    z0 = kl_ref.detach().clamp(min=0.0)
    log_ratio = policy_logps - ref_logps
    labels = labels.bool()
    desirable = desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - log_ratio)))
    losses = torch.where(labels, desirable, undesirable)
    return losses, beta * log_ratio.detach()
