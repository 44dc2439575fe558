"""Preferences over trajectory segments (Christiano et al. 2017, "Deep RL from human preferences").

A segment is a short run of (observation, action) steps; the reward model gives every step a
scalar r̂ and the segment's predicted preference follows Bradley-Terry on the summed rewards
(eq. 1 of the paper)::

    P̂[σ¹ ≻ σ²] = exp Σ r̂(σ¹) / (exp Σ r̂(σ¹) + exp Σ r̂(σ²)) = sigmoid(R¹ - R²)

and the loss is the cross-entropy against the labeler's distribution μ over {1, 2}::

    loss = -[ μ(1) log P̂[σ¹ ≻ σ²] + μ(2) log P̂[σ² ≻ σ¹] ]

with μ = (1, 0), (0, 1), or (0.5, 0.5) when the segments were judged equally good ("can't
tell" answers are dropped before this point).  Section 2.2.3: people err, so the model
assumes a fraction ε (10 % in the paper) of answers are uniformly random, which bounds the
loss of a confidently-wrong prediction::

    P = (1 - ε) P̂ + ε / 2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_preference_prob(returns_1: torch.Tensor, returns_2: torch.Tensor, label_error: float = 0.0) -> torch.Tensor:
    """P[σ¹ ≻ σ²] under Bradley-Terry with a ``label_error`` fraction of random answers.

    returns_1, returns_2: (..., N) summed predicted rewards of each segment -> (..., N) in (0, 1).
    """
    p = torch.sigmoid(returns_1 - returns_2)
    return (1.0 - label_error) * p + label_error / 2.0


def segment_preference_loss(
    returns_1: torch.Tensor,
    returns_2: torch.Tensor,
    mu: torch.Tensor,
    label_error: float = 0.1,
) -> torch.Tensor:
    """Mean cross-entropy of the labels under :func:`segment_preference_prob` (Christiano et al. eq. 1).

    returns_1, returns_2: (N,) Σ_t r̂(s_t, a_t) of the first and second segment of each pair;
    mu: (N,) the labeler's probability that the first segment is better (1, 0 or 0.5 for "equal");
    label_error: ε, the assumed fraction of uniformly random answers (0 gives plain Bradley-Terry).
    Returns a 0-dim loss.  Computed in log space so that large return gaps stay finite.
    """
    if not 0.0 <= label_error < 1.0:
        raise ValueError(f"label_error must be in [0, 1), got {label_error}")
    diff = returns_1 - returns_2
    mu = mu.to(diff.dtype)
    if label_error == 0.0:
        log_p1, log_p2 = F.logsigmoid(diff), F.logsigmoid(-diff)
    else:
        # log((1-ε) σ(d) + ε/2) = logaddexp(log(1-ε) + logσ(d), log(ε/2))
        keep = torch.log1p(torch.tensor(-label_error, dtype=diff.dtype))
        rand = torch.log(torch.tensor(label_error / 2.0, dtype=diff.dtype))
        log_p1 = torch.logaddexp(keep + F.logsigmoid(diff), rand)
        log_p2 = torch.logaddexp(keep + F.logsigmoid(-diff), rand)
    return -(mu * log_p1 + (1.0 - mu) * log_p2).mean()
