"""Token-id conventions: the label that masks a position out of a loss, and cutting responses at EOS."""

from __future__ import annotations

import torch

from kilter.errors import KilterError

IGNORE_INDEX = -100
"""Label of a position no loss reads (prompt tokens, padding): PyTorch's cross-entropy default."""


def first_true_index(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim, or its length when a row has none.

    flags: (B, T) bool -> (B,) long.
    """
    length = flags.shape[-1]
    positions = torch.arange(length, device=flags.device).expand_as(flags)
    sentinel = torch.full_like(positions, length)
    return torch.where(flags.bool(), positions, sentinel).amin(dim=-1)


def truncate_after_eos(
    token_ids: torch.Tensor, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace everything after each row's first EOS with PAD; return the ids and a response mask.

    token_ids: (B, T) sampled response ids -> (ids (B, T), mask (B, T) long).  The mask is 1
    up to *and including* the first EOS, so the policy is trained to stop; a row that never
    samples EOS keeps all its tokens (it was cut by the length limit).  PAD must differ from
    EOS, or the EOS would be indistinguishable from padding downstream.
    """
    if eos_id == pad_id:
        raise KilterError(
            f"pad token id ({pad_id}) must differ from eos token id ({eos_id}) so EOS stays in the training mask"
        )
    first_eos = first_true_index(token_ids == eos_id)
    positions = torch.arange(token_ids.shape[-1], device=token_ids.device)
    keep = positions.unsqueeze(0) <= first_eos.unsqueeze(-1)
    ids = torch.where(keep, token_ids, torch.full_like(token_ids, pad_id))
    return ids, keep.long()
