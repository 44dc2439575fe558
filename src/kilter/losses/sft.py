"""Token-level cross-entropy for supervised fine-tuning (phase 1) and language modelling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kilter.ops.tokens import IGNORE_INDEX


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the labelled tokens; labels are ALREADY aligned with logits.

    logits: (B, T, V); labels: (B, T) where ``labels[b, t]`` is the token that
    ``logits[b, t]`` should predict (no shift happens here -- use :func:`causal_lm_loss`
    for the usual "labels = input ids" convention).  Positions equal to ``ignore_index``
    (prompt tokens, padding) do not count.

    Returns (loss 0-dim, n_tokens 0-dim long).  With no labelled tokens the loss is 0
    (still attached to the graph), so an all-prompt batch does not produce nan.  For
    gradient accumulation across micro-batches of different sizes, weight each loss by its
    ``n_tokens`` and divide by the total.
    """
    valid = labels != ignore_index
    n_tokens = valid.sum()
    # Upcast: bf16 cross-entropy loses precision in the log-sum-exp over large vocabularies.
    summed = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1).long(),
        ignore_index=ignore_index,
        reduction="sum",
    )
    return summed / n_tokens.clamp(min=1), n_tokens


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy with the shift done here, as in Hugging Face causal LMs.

    logits: (B, T, V) from the model on ``input_ids`` (B, T); labels: (B, T) = the input ids
    with ``ignore_index`` on positions not to learn (see :func:`make_labels`).  ``logits[:, t]``
    is scored against ``labels[:, t + 1]``; the last logit and the first label are dropped.
    Returns (mean loss, n_tokens) as :func:`sft_loss`.
    """
    return sft_loss(logits[:, :-1, :], labels[:, 1:], ignore_index=ignore_index)


def make_labels(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Unshifted labels for :func:`causal_lm_loss`: the ids where ``loss_mask`` is set, else ignore.

    input_ids, loss_mask: (B, T) -> (B, T) long.  ``loss_mask`` is 1 on completion tokens
    (including EOS) and 0 on prompt and padding.
    """
    return torch.where(loss_mask != 0, input_ids.long(), torch.full_like(input_ids.long(), ignore_index))
