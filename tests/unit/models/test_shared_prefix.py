"""Shared-prefix layout worked by hand, and the model checks."""

from __future__ import annotations

import torch

from kilter.models import packed
from kilter.models import shared_prefix as sp


def test_common_prefix():
    assert sp.common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert sp.common_prefix([[1, 2], [3]]) == 0
    assert sp.common_prefix([[4, 5, 6]]) == 3  # a group of one shares everything with itself


def test_layout_by_hand():
    batch = sp.pack_groups([[[1, 2, 3, 4], [1, 2, 5]], [[7, 8]]], pad_id=0, capacity=16)
    # group 0: prefix [1, 2], own [3, 4] and [5]; group 1: [7, 8] alone
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1]]
    assert batch.where.tolist() == [[0, 1, 2, 3], [0, 1, 4, -1], [5, 6, -1, -1]]
    assert batch.last_index().tolist() == [3, 4, 6]
    assert batch.n_tokens == 7
    want = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],  # token 5 sees the prefix and itself, not its sibling's 3, 4
        [0, 0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(batch.attention_mask[0, 0], want)
    # the prefix's last token predicts both first own tokens
    assert sp.predicting_index(batch, torch.tensor([0, 1]), torch.tensor([2, 2])).tolist() == [1, 1]


def test_rows_end_in_padding_that_sees_only_itself():
    batch = sp.pack_groups([[[1, 2, 3]], [[4, 5]], [[6]]], pad_id=0, capacity=3)
    mask = batch.attention_mask[:, 0]
    for r in range(batch.input_ids.shape[0]):
        assert bool(mask[r].any(-1).all())  # no query without a key (SDPA would give nan)
        pad = batch.input_ids[r] == 0
        if pad.any():
            assert not bool(mask[r][pad][:, ~pad].any())  # padding never sees real tokens
            assert not bool(mask[r][~pad][:, pad].any())  # and real tokens never see padding


def test_checks_pass_for_the_builtin_models_and_fail_for_a_wrong_wrapper():
    from kilter.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("builtin:micro")
    model = load_causal_lm("builtin:micro", tok)
    wrapper, ok = packed.fast_causal_lm(model, "cpu")
    assert ok and sp.check_lm(model, wrapper, "cpu")

    class IgnoresTheMask(torch.nn.Module):  # drops the 4-D mask: siblings would see each other
        def forward(self, input_ids, attention_mask=None, position_ids=None, select=None, index=None):
            return wrapper(input_ids, None, position_ids, index=index)

    assert not sp.check_lm(model, IgnoresTheMask(), "cpu")
