"""SFT trainer pieces: the masked loss sum, batch order, micro-batches, the LR schedule."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kilter.data.collate import pad_batch
from kilter.losses import causal_lm_loss
from kilter.models.packed import fast_causal_lm, pack_micro_batch
from kilter.trainers.sft import _forward_sum
from kilter.training.optim import OptimConfig, lr_factor

IGNORE = -100


class FixedLogits(torch.nn.Module):
    """A stand-in model that returns given logits and records what it was called with."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = torch.nn.Parameter(logits.clone())
        self.calls: list[dict] = []

    def forward(self, input_ids, attention_mask, position_ids=None, use_cache=None):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                           "use_cache": use_cache})
        return SimpleNamespace(logits=self.logits)


def _batch():
    # Row 0: 2 prompt tokens, 2 completion tokens, 1 pad.  Row 1: 1 prompt token, 4 completion tokens.
    input_ids = torch.tensor([[5, 6, 1, 2, 0], [7, 2, 1, 1, 2]])
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2, IGNORE], [IGNORE, 2, 1, 1, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _logits():
    """(2, 5, 3) logits; logits[b, t] predicts labels[b, t + 1]."""
    ln2 = math.log(2.0)
    logits = torch.zeros(2, 5, 3)
    # row 0: t=1 predicts label 1 from uniform logits -> ln 3; t=2 predicts 2 with logit ln 2 -> p=1/2 -> ln 2
    logits[0, 2] = torch.tensor([0.0, 0.0, ln2])
    # row 1: t=0 -> label 2 uniform (ln 3); t=1 -> label 1 with p=2/4 (ln 2); t=2 -> label 1 uniform (ln 3);
    #        t=3 -> label 2 with logits (0, 0, ln 4): p = 4/6 -> ln 1.5
    logits[1, 1] = torch.tensor([0.0, ln2, 0.0])
    logits[1, 3] = torch.tensor([0.0, 0.0, math.log(4.0)])
    return logits


def test_forward_sum_matches_hand_worked_numbers():
    model = FixedLogits(_logits())
    total, n = _forward_sum(model, _batch(), "fp32", "cpu")
    assert n.item() == 6
    expected = 3 * math.log(3) + 2 * math.log(2) + math.log(1.5)
    assert total.item() == pytest.approx(expected, rel=1e-6)
    call = model.calls[0]
    assert call["use_cache"] is False and call["position_ids"] is None
    assert torch.equal(call["attention_mask"], _batch()["attention_mask"])


def test_prompt_and_padding_positions_do_not_count():
    base = _logits()
    total, _ = _forward_sum(FixedLogits(base), _batch(), "fp32", "cpu")
    garbage = base.clone()
    # the positions that predict prompt tokens (row 0 t=0) or follow the last label (t=4) or pad (row 0 t=3)
    garbage[0, 0] = torch.tensor([50.0, -50.0, 9.0])
    garbage[0, 3] = torch.tensor([-7.0, 30.0, 2.0])
    garbage[:, 4] = torch.tensor([100.0, 3.0, -100.0])
    changed, _ = _forward_sum(FixedLogits(garbage), _batch(), "fp32", "cpu")
    assert changed.item() == total.item()
    # ...while a completion position does count
    garbage[0, 1] = torch.tensor([5.0, 0.0, 0.0])
    assert _forward_sum(FixedLogits(garbage), _batch(), "fp32", "cpu")[0].item() != pytest.approx(total.item())


def test_forward_sum_gradient_reaches_only_completion_positions():
    model = FixedLogits(_logits())
    total, _ = _forward_sum(model, _batch(), "fp32", "cpu")
    total.backward()
    touched = model.logits.grad.abs().sum(-1) > 0
    assert touched.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]


def test_forward_sum_passes_position_ids_for_packed_rows():
    batch = _batch()
    batch["position_ids"] = torch.tensor([[0, 1, 0, 1, 0], [0, 1, 2, 3, 4]])
    model = FixedLogits(_logits())
    _forward_sum(model, batch, "fp32", "cpu")
    assert torch.equal(model.calls[0]["position_ids"], batch["position_ids"])


def test_forward_sum_on_a_real_model_is_padding_invariant():
    from kilter.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer("builtin:micro")
    model = load_causal_lm("builtin:micro", tok)
    examples = [
        {"input_ids": [10, 11, 12, 13, 14, 15, 16], "labels": [IGNORE, IGNORE, IGNORE, 13, 14, 15, 16]},
        {"input_ids": [20, 21, 22], "labels": [IGNORE, 21, 22]},
    ]
    with torch.no_grad():
        total, n = _forward_sum(model, pad_batch(examples, tok.pad_token_id), "fp32", "cpu")
        singles = []
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            mean, count = causal_lm_loss(model(input_ids=ids).logits, torch.tensor([ex["labels"]]))
            singles.append((mean * count).item())
    assert n.item() == 4 + 2
    assert total.item() == pytest.approx(sum(singles), rel=1e-5)


def test_fast_paths_give_the_padded_loss():
    """Completion-only logits and padding-free packed rows change no number the loss sees."""
    from kilter.models import load_causal_lm, load_tokenizer
    from kilter.trainers.sft import _forward_sum_fast

    tok = load_tokenizer("builtin:micro")
    model = load_causal_lm("builtin:micro", tok)
    loss_model, packed_ok = fast_causal_lm(model, "cpu")
    assert loss_model is not None and packed_ok  # a Llama supports both in this transformers
    examples = [
        {"input_ids": [10, 11, 12, 13, 14, 15, 16], "labels": [IGNORE, IGNORE, IGNORE, 13, 14, 15, 16]},
        {"input_ids": [20, 21, 22], "labels": [IGNORE, 21, 22]},
        {"input_ids": [30, 31, 32, 33, 34], "labels": [IGNORE, IGNORE, 32, 33, 34]},
        {"input_ids": [40, 41], "labels": [IGNORE, 41]},
    ]
    with torch.no_grad():
        ref, n_ref = _forward_sum(model, pad_batch(examples, tok.pad_token_id), "fp32", "cpu")
        padded, n_padded = _forward_sum_fast(loss_model, pad_batch(examples, tok.pad_token_id), "fp32", "cpu")
        packed_batch = pack_micro_batch(examples, tok.pad_token_id, capacity=10)
        packed, n_packed = _forward_sum_fast(loss_model, packed_batch, "fp32", "cpu")
    assert n_ref.item() == n_padded.item() == n_packed.item() == 4 + 2 + 3 + 1
    assert packed_batch["input_ids"].shape[0] < len(examples)  # several examples really share a row
    assert padded.item() == pytest.approx(ref.item(), rel=1e-5)
    assert packed.item() == pytest.approx(ref.item(), rel=1e-5)  # no attention across examples


# --------------------------------------------------------------------------- schedule


def test_warmup_then_cosine_to_min_lr():
    cfg = OptimConfig(warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, 10, cfg) == pytest.approx(0.5)
    assert lr_factor(1, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(2, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(6, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert lr_factor(10, 10, cfg) == pytest.approx(0.1)
    linear = OptimConfig(warmup_steps=0, warmup_ratio=0.0, schedule="linear", min_lr_ratio=0.0)
    assert lr_factor(5, 20, linear) == pytest.approx(0.75)
    ratio = OptimConfig(warmup_ratio=0.25, schedule="constant")
    assert [lr_factor(s, 8, ratio) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
