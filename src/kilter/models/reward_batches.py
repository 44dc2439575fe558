"""Reward-model rows: K-way groups of responses flattened into one batch, and their scores.

A group is one prompt's responses (``examples``: tokenized prompt + response) with its labeled
pairs; :func:`collate_groups` lays the responses out as padded rows, padding-free packed rows, or
packed rows in which a group's responses share one copy of their prompt, and :func:`score_rows`
runs the reward model on whichever layout it gets.  Used by ``kilter rm``'s training and eval.
"""

from __future__ import annotations

import torch

from kilter.data.collate import pad_batch
from kilter.losses import pair_weights
from kilter.models import packed
from kilter.models.precision import autocast
from kilter.models.reward import raw_scores
from kilter.models.shared_prefix import pack_groups


def collate_groups(groups: list[dict], pad_id: int, margin_scale: float = 1.0,
                   pack_capacity: int | None = None, shared_prefix: bool = False,
                   attention_weight: float = 0.0) -> dict[str, torch.Tensor]:
    """Flatten encoded groups into one padded batch of responses plus pair indices.

    Returns ``input_ids``/``attention_mask`` (N, T) with N = total responses (each once)
    (with ``pack_capacity``: packed rows, see :func:`kilter.models.packed.pack_micro_batch`;
    with ``shared_prefix`` too, a group's responses share one copy of the prompt and
    ``attention_mask`` is 4-D, see :mod:`kilter.models.shared_prefix`),
    ``better``/``worse`` (P,) row indices of every labeled pair, ``pair_group`` (P,) the group
    of each pair, ``pair_weight`` (P,) its weight in the loss
    (:func:`kilter.losses.pair_weights`), ``margin`` (P,) = margin_scale * strength (0 where no
    strength), and ``n_groups`` (0-dim).
    """
    rows, better, worse, pair_group, margin = [], [], [], [], []
    for g, group in enumerate(groups):
        offset = len(rows)
        rows.extend(group["examples"])
        for b, w, strength in group["pairs"]:
            better.append(offset + b)
            worse.append(offset + w)
            pair_group.append(g)
            margin.append(margin_scale * strength if strength is not None else 0.0)
    if pack_capacity and shared_prefix:
        sp = pack_groups([[list(ex["input_ids"]) for ex in group["examples"]] for group in groups], pad_id,
                         pack_capacity, attention_weight)
        batch = {"input_ids": sp.input_ids, "position_ids": sp.position_ids, "attention_mask": sp.attention_mask,
                 "last_index": sp.last_index(), "n_tokens": sp.lengths.sum()}
    elif pack_capacity:
        batch = packed.pack_micro_batch([{"input_ids": r["input_ids"]} for r in rows], pad_id, pack_capacity,
                                        attention_weight=attention_weight)
    else:
        batch = pad_batch(rows, pad_id, keys=("input_ids",))
    batch.update(better=torch.tensor(better, dtype=torch.long), worse=torch.tensor(worse, dtype=torch.long),
                 pair_group=torch.tensor(pair_group, dtype=torch.long),
                 margin=torch.tensor(margin, dtype=torch.float32), n_groups=torch.tensor(len(groups)))
    independent = torch.tensor([bool(g.get("independent", False)) for g in groups], dtype=torch.bool)
    batch["pair_weight"] = pair_weights(batch["pair_group"], independent)
    return batch


def score_rows(model, batch: dict, precision: str, device: str) -> torch.Tensor:
    """(N,) raw scores of a :func:`collate_groups` batch (packed rows go through packed.LastTokenScores)."""
    with autocast(precision, device):
        if "last_index" in batch:  # packed rows through packed.LastTokenScores
            mask = batch.get("attention_mask")  # 4-D with shared prefixes, else none
            return model(batch["input_ids"].to(device), batch["position_ids"].to(device),
                         batch["last_index"].to(device), attention_mask=None if mask is None else mask.to(device))
        return raw_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))


def chunks_of_rows(groups: list[dict], rows_per_batch: int) -> list[list[dict]]:
    """Consecutive groups cut into chunks of at most ``rows_per_batch`` responses (a bigger group alone)."""
    chunks, current, n = [], [], 0
    for g in groups:
        if current and n + len(g["examples"]) > rows_per_batch:
            chunks.append(current)
            current, n = [], 0
        current.append(g)
        n += len(g["examples"])
    return chunks + ([current] if current else [])
