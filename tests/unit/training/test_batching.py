"""Epoch order and micro-batches shared by every trainer: pure functions of (seed, epoch)."""

from __future__ import annotations

import pytest

from kilter.training.batching import epoch_batches, micro_batches


@pytest.mark.parametrize("by_length", [False, True])
def test_epoch_batches_are_a_pure_function_of_seed_and_epoch(by_length):
    lengths = [(i * 37) % 50 + 1 for i in range(103)]
    first = epoch_batches(lengths, 8, seed=3, epoch=0, by_length=by_length)
    assert first == epoch_batches(lengths, 8, seed=3, epoch=0, by_length=by_length)
    assert len(first) == 103 // 8 and all(len(b) == 8 for b in first)  # the short remainder is dropped
    flat = [i for b in first for i in b]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(103))
    assert epoch_batches(lengths, 8, seed=3, epoch=1, by_length=by_length) != first
    assert epoch_batches(lengths, 8, seed=4, epoch=0, by_length=by_length) != first


def test_length_grouping_cuts_padding():
    lengths = [(i * 37) % 50 + 1 for i in range(400)]

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 8, seed=0, epoch=0, by_length=True)
    shuffled = epoch_batches(lengths, 8, seed=0, epoch=0, by_length=False)
    assert padding(grouped) < padding(shuffled) / 4


def testmicro_batches():
    assert micro_batches(list(range(8)), 1) == [list(range(8))]
    assert micro_batches(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert micro_batches([9, 3, 5, 1, 7, 2], 3) == [[9, 3], [5, 1], [7, 2]]
    # uneven: ceil-sized pieces, every index exactly once, order kept
    assert micro_batches(list(range(10)), 3) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]



def test_the_short_last_batch_is_dropped_and_micro_batches_split_evenly():
    lengths = [3, 9, 4, 7, 5, 5, 8, 2, 6, 1]
    for by_length in (True, False):
        a = epoch_batches(lengths, 4, seed=3, epoch=1, by_length=by_length)
        assert a == epoch_batches(lengths, 4, seed=3, epoch=1, by_length=by_length)
        assert a != epoch_batches(lengths, 4, seed=3, epoch=2, by_length=by_length)
        assert len(a) == 2 and all(len(b) == 4 for b in a)  # the short last batch is dropped
        assert len({i for b in a for i in b}) == 8
    assert micro_batches([1, 2, 3, 4, 5], 2) == [[1, 2, 3], [4, 5]]
