"""SFT fast paths: padding-free packed micro-batches and completion-only logits give the padded loss."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kilter.data.collate import pad_batch
from kilter.models.packed import best_packing, fast_causal_lm, pack_micro_batch, pack_rows
from kilter.trainers.sft import _forward_sum, _forward_sum_fast

IGNORE = -100


def test_pack_rows_is_first_fit_decreasing():
    # lengths 5, 3, 2, 4 into rows of 8: 5 opens row 0, 4 opens row 1, 3 joins row 0 (8), 2 joins row 1 (6)
    assert pack_rows([5, 3, 2, 4], 8) == [[0, 1], [3, 2]]
    # an example longer than the capacity gets a row of its own
    assert pack_rows([10, 2], 8) == [[0], [1]]


def test_best_packing_minimises_computed_slots():
    # candidates are the longest example (6) and the capacity (10):
    # capacity 6: rows [6], [5], [4, 2], [3] -> 4 x 6 = 24 slots; capacity 10: [6, 4], [5, 3, 2] -> 2 x 10 = 20.
    rows, width = best_packing([6, 5, 4, 3, 2], 10)
    assert width == 10 and sorted(map(sorted, rows)) == [[0, 2], [1, 3, 4]]


def test_pack_micro_batch_layout():
    examples = [
        {"input_ids": [11, 12, 13, 14], "labels": [IGNORE, IGNORE, 13, 14]},
        {"input_ids": [21, 22, 23], "labels": [21, 22, 23]},  # a text example: its first label must go
    ]
    batch = pack_micro_batch(examples, pad_id=0, capacity=8)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 13, 14, IGNORE, 22, 23]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2]]
    assert int(batch["n_tokens"]) == 7 and "attention_mask" not in batch
    # two rows when they do not fit: the shorter row ends in padding that starts its own positions
    batch = pack_micro_batch(examples, pad_id=0, capacity=5)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14], [21, 22, 23, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0]]
    assert batch["labels"].tolist() == [[IGNORE, IGNORE, 13, 14], [IGNORE, 22, 23, IGNORE]]




@pytest.mark.parametrize("lora", [False, True])
def test_fast_paths_give_the_padded_loss_and_gradients(lora, micro_policy):
    tok, model = micro_policy(lora)
    model.train()
    wrapper, packed_ok = fast_causal_lm(model, "cpu")
    assert wrapper is not None and packed_ok
    assert model.training  # the probe restores the mode
    gen = torch.Generator().manual_seed(1)
    examples = []
    for n_prompt, n_completion in [(3, 9), (5, 2), (2, 4), (6, 7), (1, 1)]:
        ids = torch.randint(10, 200, (n_prompt + n_completion,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]})

    def run(fn, batch):
        model.zero_grad()
        total, n = fn(batch)
        total.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return total.item(), n.item(), grads

    padded = pad_batch(examples, tok.pad_token_id)
    reference = run(lambda b: _forward_sum(model, b, "fp32", "cpu"), padded)
    for batch in (padded, pack_micro_batch(examples, tok.pad_token_id, capacity=20)):
        got = run(lambda b: _forward_sum_fast(wrapper, b, "fp32", "cpu"), batch)
        assert got[1] == reference[1] == 9 + 2 + 4 + 7 + 1  # every completion token (prompts come first)
        assert got[0] == pytest.approx(reference[0], rel=1e-5)
        assert torch.allclose(got[2], reference[2], atol=1e-6, rtol=1e-4)


def test_models_without_a_decoder_split_keep_the_ordinary_path():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 4)
            self.out = torch.nn.Linear(4, 50)

        def get_input_embeddings(self):
            return self.emb

        def forward(self, input_ids, position_ids=None, use_cache=None, attention_mask=None):
            # ignores position_ids, so packed rows would leak across examples: must be detected
            return SimpleNamespace(logits=self.out(self.emb(input_ids).cumsum(1)))

    wrapper, packed_ok = fast_causal_lm(Plain(), "cpu")
    assert wrapper is None and packed_ok is False
