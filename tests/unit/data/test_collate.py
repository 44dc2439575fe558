"""Collation: padding, packing, length-bucketed batches, data-parallel sharding."""

from __future__ import annotations

import random

import pytest
import torch

from kilter.data.collate import length_bucketed_batches, pack_examples, pad_batch, shard_indices

PAD, EOS = 0, 1
EXAMPLES = [
    {"input_ids": [5, 6, 7, EOS], "labels": [-100, -100, 7, EOS], "prompt_len": 2},
    {"input_ids": [8, EOS], "labels": [-100, EOS], "prompt_len": 1},
]


def test_pad_batch_right():
    batch = pad_batch(EXAMPLES, pad_id=PAD)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, -100, 7, EOS], [-100, EOS, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_pad_batch_left_multiple_of_and_custom_values():
    batch = pad_batch(EXAMPLES, pad_id=PAD, side="left", pad_to_multiple_of=3, pad_values={"labels": -1})
    assert batch["input_ids"].tolist() == [[PAD, PAD, 5, 6, 7, EOS], [PAD, PAD, PAD, PAD, 8, EOS]]
    assert batch["labels"].tolist() == [[-1, -1, -100, -100, 7, EOS], [-1, -1, -1, -1, -100, EOS]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]]


def test_pad_batch_prompts_only_and_errors():
    prompts = [{"input_ids": [3, 4, 5]}, {"input_ids": [9]}]
    batch = pad_batch(prompts, pad_id=PAD, side="left")
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].tolist() == [[3, 4, 5], [PAD, PAD, 9]]
    with pytest.raises(ValueError, match="'labels' and 'input_ids' differ in length"):
        pad_batch([{"input_ids": [1, 2], "labels": [1]}], pad_id=PAD)
    with pytest.raises(ValueError, match="in some examples but not all"):
        pad_batch([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], pad_id=PAD)
    with pytest.raises(ValueError, match="at least one example"):
        pad_batch([], pad_id=PAD)


def test_pack_examples_positions_and_boundary_labels():
    examples = [
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
        {"input_ids": [20, 21], "labels": [20, 21]},
        {"input_ids": [30, 31, 32, 33], "labels": [30, 31, 32, 33]},
        {"input_ids": [40, 41], "labels": [-100, 41]},
    ]
    rows = pack_examples(examples, max_length=6)
    # greedy, in order: [3 + 2] (the 4-token one does not fit), then [4 + 2]
    assert rows == [
        {
            "input_ids": [10, 11, 12, 20, 21],
            "labels": [-100, 11, 12, -100, 21],
            "position_ids": [0, 1, 2, 0, 1],
            "seq_lens": [3, 2],
        },
        {
            "input_ids": [30, 31, 32, 33, 40, 41],
            "labels": [-100, 31, 32, 33, -100, 41],
            "position_ids": [0, 1, 2, 3, 0, 1],
            "seq_lens": [4, 2],
        },
    ]
    batch = pad_batch(rows, pad_id=PAD)  # position_ids are padded too (with 0) when present
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["labels"][0, 5].item() == -100


def test_pack_examples_rejects_too_long():
    with pytest.raises(ValueError, match="example 1 has 5 tokens, more than max_length=4"):
        pack_examples([{"input_ids": [1]}, {"input_ids": [1, 2, 3, 4, 5]}], max_length=4)


def test_length_bucketed_batches_without_shuffle_by_hand():
    lengths = [5, 1, 9, 3, 7, 2]
    # one mega-batch (50 * 2 >= 6), sorted longest first: 2(9) 4(7) 0(5) 3(3) 5(2) 1(1)
    assert length_bucketed_batches(lengths, batch_size=2, seed=0, shuffle=False) == [[2, 4], [0, 3], [5, 1]]
    assert length_bucketed_batches(lengths, batch_size=4, seed=0, shuffle=False, drop_last=True) == [[2, 4, 0, 3]]
    # mega-batches of 1 * 2 keep the sorting local
    assert length_bucketed_batches(lengths, 2, 0, shuffle=False, mega_batch_factor=1) == [[0, 1], [2, 3], [4, 5]]


def test_length_bucketed_batches_deterministic_and_complete():
    rng = random.Random(1)
    lengths = [rng.randint(1, 200) for _ in range(500)]
    first = length_bucketed_batches(lengths, batch_size=4, seed=7)
    assert first == length_bucketed_batches(lengths, batch_size=4, seed=7)
    assert first != length_bucketed_batches(lengths, batch_size=4, seed=8)
    assert sorted(i for b in first for i in b) == list(range(500))
    assert all(len(b) == 4 for b in first)

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    random_order = list(range(500))
    random.Random(7).shuffle(random_order)
    plain = [random_order[i : i + 4] for i in range(0, 500, 4)]
    assert padded_tokens(first) < 0.8 * padded_tokens(plain)


def test_shard_indices():
    batch = [10, 11, 12, 13, 14, 15, 16, 17]
    assert shard_indices(batch, rank=0, world_size=2) == [10, 12, 14, 16]
    assert shard_indices(batch, rank=1, world_size=2) == [11, 13, 15, 17]
    assert shard_indices(batch, rank=0, world_size=1) == batch
    shards = [shard_indices(batch, r, 3) for r in range(3)]
    assert shards == [[10, 13, 16], [11, 14, 17], [12, 15]]
    assert sorted(sum(shards, [])) == batch
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        shard_indices(batch, rank=2, world_size=2)
