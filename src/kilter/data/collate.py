"""Batching: padding, sequence packing, length-bucketed batches and data-parallel sharding.

Examples are the dicts made by :mod:`kilter.data.tokenize` (``input_ids``, ``labels``, ...,
as lists of ints); :func:`pad_batch` turns a list of them into ``(B, T)`` LongTensors.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch

from kilter.data.tokenize import IGNORE_INDEX

__all__ = ["pad_batch", "pack_examples", "length_bucketed_batches", "shard_indices", "DEFAULT_PAD_VALUES"]

# Labels pad with the ignore index so padding never enters the loss; positions pad with 0.
DEFAULT_PAD_VALUES: dict[str, int] = {"labels": IGNORE_INDEX, "position_ids": 0}


def pad_batch(
    examples: Sequence[Mapping],
    pad_id: int,
    keys: Sequence[str] = ("input_ids", "labels", "position_ids"),
    pad_values: Mapping[str, int] | None = None,
    side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad the ``keys`` of every example to one length and stack them.

    Returns ``(B, T)`` LongTensors for each of ``keys`` present in the examples (so packed
    rows from :func:`pack_examples` keep their ``position_ids``), plus
    ``attention_mask`` (1 on real tokens of ``input_ids``, 0 on padding).  ``input_ids`` pad
    with ``pad_id``; other keys with ``pad_values[key]`` (default: labels -100, position_ids 0;
    else ``pad_id``).  ``side="left"`` suits generation, where every prompt must end at
    the last column.  ``T`` is the longest example, rounded up to ``pad_to_multiple_of``.
    """
    if not examples:
        raise ValueError("pad_batch needs at least one example")
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    values = {**DEFAULT_PAD_VALUES, **(pad_values or {})}
    present = [k for k in keys if k in examples[0]]
    for key in present:
        if not all(key in ex for ex in examples):
            raise ValueError(f"key {key!r} is in some examples but not all")
    if "input_ids" not in present:
        raise ValueError("pad_batch needs 'input_ids' in the examples")
    lengths = [len(ex["input_ids"]) for ex in examples]
    for key in present:
        if [len(ex[key]) for ex in examples] != lengths:
            raise ValueError(f"{key!r} and 'input_ids' differ in length in some example")
    width = max(lengths)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    out: dict[str, torch.Tensor] = {}
    for key in present:
        fill = pad_id if key == "input_ids" else values.get(key, pad_id)
        tensor = torch.full((len(examples), width), fill, dtype=torch.long)
        for row, ex in enumerate(examples):
            seq = torch.as_tensor(list(ex[key]), dtype=torch.long)
            if side == "right":
                tensor[row, : len(seq)] = seq
            else:
                tensor[row, width - len(seq) :] = seq
        out[key] = tensor
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n :] = 1
    out["attention_mask"] = mask
    return out


def pack_examples(examples: Sequence[Mapping], max_length: int) -> list[dict]:
    """Greedily pack consecutive examples into rows of at most ``max_length`` tokens.

    Each row holds ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for each
    sequence) and ``seq_lens`` (the packed sequences' lengths, in order).  Examples are taken
    in order; one that does not fit in the current row starts the next row.

    The first label of every sequence is -100: with the usual shift, that token would be
    predicted from the *previous* sequence's last token, so nothing is learned across a
    boundary.  Attention across sequences is NOT masked by this alone: HF models use the
    restarting ``position_ids`` to recover the boundaries only with packed-aware attention
    (``attn_implementation="flash_attention_2"``); with eager/SDPA attention a token also
    attends to the earlier sequences of its row.  Packing then trades some contamination of
    the context for no padding.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    rows: list[dict] = []
    current: dict[str, list] | None = None
    for index, ex in enumerate(examples):
        ids = list(ex["input_ids"])
        labels = list(ex.get("labels", ids))
        if len(ids) > max_length:
            raise ValueError(f"example {index} has {len(ids)} tokens, more than max_length={max_length}")
        if not ids:
            continue
        if current is None or len(current["input_ids"]) + len(ids) > max_length:
            current = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
            rows.append(current)
        current["input_ids"] += ids
        current["labels"] += [IGNORE_INDEX] + labels[1:]
        current["position_ids"] += list(range(len(ids)))
        current["seq_lens"].append(len(ids))
    return rows


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    drop_last: bool = False,
    mega_batch_factor: int = 50,
) -> list[list[int]]:
    """Batches of indices whose examples have similar lengths, to cut padding.

    The indices are shuffled (if ``shuffle``), cut into mega-batches of
    ``mega_batch_factor * batch_size``, sorted by length (longest first) inside each, and
    split into batches; the batches are then shuffled.  The same ``seed`` gives the same
    batches; every index appears exactly once (unless ``drop_last`` drops short batches).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    mega = mega_batch_factor * batch_size
    batches: list[list[int]] = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    if drop_last:
        batches = [b for b in batches if len(b) == batch_size]
    if shuffle:
        rng.shuffle(batches)
    return batches


def shard_indices(batch_indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of one global batch: every ``world_size``-th index from ``rank``.

    Choose a global batch divisible by ``world_size`` so every rank gets the same number of
    examples; the ranks together then see exactly the batch one process would.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(batch_indices[rank::world_size])
