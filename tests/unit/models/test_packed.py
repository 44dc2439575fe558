"""Padding-free sequence log-probs (DPO's fast path) give the padded numbers and gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from kilter.data.collate import pad_batch
from kilter.models import logprobs, packed
from kilter.models.logprobs import sequence_logps
from kilter.models.lora import LoraSection, apply_lora
from kilter.models.reference import Reference

IGNORE = -100


def test_pack_micro_batch_records_each_tokens_example():
    examples = [{"input_ids": [11, 12, 13], "labels": [IGNORE, 12, 13]},
                {"input_ids": [21, 22], "labels": [IGNORE, 22]},
                {"input_ids": [31, 32, 33, 34]}]  # no labels: contributes none
    batch = packed.pack_micro_batch(examples, pad_id=0, capacity=5)
    # first-fit decreasing at the best width: [34-long example, ...]
    owners = batch["example_index"]
    for row_ids, row_owner in zip(batch["input_ids"].tolist(), owners.tolist()):
        for tok, owner in zip(row_ids, row_owner):
            if owner == -1:
                assert tok == 0
            else:
                assert tok in examples[owner]["input_ids"]
    assert int((owners >= 0).sum()) == 3 + 2 + 4
    assert int((batch["labels"] != IGNORE).sum()) == 2 + 1


def _examples(gen: torch.Generator) -> list[dict]:
    out = []
    for n_prompt, n_response in [(3, 9), (5, 2), (2, 4), (6, 7), (1, 1), (4, 3)]:
        ids = torch.randint(10, 200, (n_prompt + n_response,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE] * n_prompt + ids[n_prompt:]})
    return out




@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_packed_sequence_logps_equal_the_padded_ones(lora, average, micro_policy):
    tok, model = micro_policy(lora)
    wrapper, ok = packed.fast_causal_lm(model, "cpu")
    assert wrapper is not None and ok
    examples = _examples(torch.Generator().manual_seed(3))

    def grads():
        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
        return g

    want = sequence_logps(model, pad_batch(examples, tok.pad_token_id), "fp32", "cpu", average=average)
    (want * torch.arange(1.0, 7.0)).sum().backward()  # distinct weights: a mix-up of examples shows
    want_grads = grads()
    got = logprobs.packed_sequence_logps(wrapper, examples, tok.pad_token_id, 16, "fp32", "cpu", average=average)
    (got * torch.arange(1.0, 7.0)).sum().backward()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(grads(), want_grads, atol=1e-6, rtol=1e-4)
    # hand check of one entry: example 4 has a single response token
    logits = model(input_ids=torch.tensor([examples[4]["input_ids"]])).logits[0, 0]
    assert float(got[4]) == pytest.approx(float(torch.log_softmax(logits, -1)[examples[4]["input_ids"][1]]),
                                          abs=1e-5)


def _pairs(gen: torch.Generator) -> list[dict]:
    """Interleaved chosen/rejected examples whose two members share a prompt (and sometimes more)."""
    out = []
    for n_prompt, n_a, n_b in [(3, 4, 2), (5, 1, 6), (2, 3, 3), (4, 2, 5)]:
        prompt = torch.randint(10, 200, (n_prompt,), generator=gen).tolist()
        for n in (n_a, n_b):
            resp = torch.randint(10, 200, (n,), generator=gen).tolist()
            out.append({"input_ids": prompt + resp, "labels": [IGNORE] * n_prompt + resp})
    out[7]["input_ids"][4] = out[6]["input_ids"][4]  # a response that starts like its sibling
    out[7]["labels"][4] = out[6]["labels"][4]
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_shared_prompt_logps_equal_the_padded_ones(lora, micro_policy):
    tok, model = micro_policy(lora)
    wrapper, ok = packed.fast_causal_lm(model, "cpu")
    assert ok and wrapper.shares_prefix
    examples = _pairs(torch.Generator().manual_seed(11))
    weights = torch.arange(1.0, 1.0 + len(examples))

    def grads():
        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
        return g

    want = sequence_logps(model, pad_batch(examples, tok.pad_token_id), "fp32", "cpu")
    (want * weights).sum().backward()
    want_grads = grads()
    got = logprobs.packed_sequence_logps(wrapper, examples, tok.pad_token_id, 32, "fp32", "cpu", group_size=2)
    (got * weights).sum().backward()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert float((grads() - want_grads).norm()) <= 1e-5 * float(want_grads.norm())


@pytest.mark.parametrize("lora", [False, True])
def test_reference_packed_logps_equal_the_padded_ones(lora, micro_policy):
    tok, model = micro_policy(lora)
    reference = Reference(model) if lora else Reference(model, copy.deepcopy(model))
    assert reference.shares_policy == lora
    assert reference.enable_packing("cpu")
    examples = _examples(torch.Generator().manual_seed(5))
    want = reference.sequence_logps(pad_batch(examples, tok.pad_token_id), "fp32", "cpu")
    got = reference.packed_sequence_logps(examples, tok.pad_token_id, 16, "fp32", "cpu")
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not got.requires_grad
    if lora:  # the adapter is back on afterwards, and it changes the log-probs
        policy = sequence_logps(model, pad_batch(examples, tok.pad_token_id), "fp32", "cpu")
        assert not torch.allclose(policy, want, atol=1e-3)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("lora", [False, True])
def test_packed_reward_scores_equal_the_padded_ones(lora, shared):
    from kilter.models import load_tokenizer
    from kilter.models.reward import load_reward_backbone, raw_scores
    from kilter.models.reward_batches import collate_groups

    tok = load_tokenizer("builtin:micro")
    torch.manual_seed(0)
    model = load_reward_backbone("builtin:micro", tok)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    if lora:
        model = apply_lora(model, LoraSection(enabled=True), task_type="SEQ_CLS")
    model.train()
    fast = packed.fast_reward_model(model, "cpu")
    assert fast is not None
    gen = torch.Generator().manual_seed(7)
    groups = [{"examples": [{"input_ids": torch.randint(10, 200, (n,), generator=gen).tolist()} for n in sizes],
               "pairs": [(0, 1, None), (1, 2, 2.0)]} for sizes in ((5, 9, 3), (4, 4, 11))]
    for g in groups:  # responses of a group share a 3-token prompt
        for ex in g["examples"][1:]:
            ex["input_ids"][:3] = g["examples"][0]["input_ids"][:3]
    padded = collate_groups(groups, tok.pad_token_id)
    packed_batch = collate_groups(groups, tok.pad_token_id, pack_capacity=16, shared_prefix=shared)
    assert fast.shares_prefix
    if shared:  # each group's prompt is computed once
        assert int((packed_batch["input_ids"] != tok.pad_token_id).sum()) == 5 + 9 + 3 + 4 + 4 + 11 - 2 * 2 * 3
    assert packed_batch["better"].tolist() == padded["better"].tolist()
    assert int(packed_batch["n_tokens"]) == int(padded["attention_mask"].sum()) == 5 + 9 + 3 + 4 + 4 + 11

    def grads():
        g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        model.zero_grad()
        return g

    want = raw_scores(model, padded["input_ids"], padded["attention_mask"])
    (want * torch.arange(1.0, 7.0)).sum().backward()
    want_grads = grads()
    got = fast(packed_batch["input_ids"], packed_batch["position_ids"], packed_batch["last_index"],
               attention_mask=packed_batch.get("attention_mask"))
    (got * torch.arange(1.0, 7.0)).sum().backward()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    diff = grads() - want_grads  # gradients reach ~1e3 here, so compare relative to their norm
    assert float(diff.norm()) <= 1e-6 * float(want_grads.norm())
    assert want.std() > 0  # distinct scores, so a swapped index would show


def test_attention_cost_prefers_narrow_rows():
    lengths = [30, 30, 30, 30]
    # slots alone: one 120-wide row and four 30-wide rows cost the same; ties go narrow anyway
    rows, width = packed.best_packing(lengths, 120)
    assert width == 30
    # 70 + 50: two rows of 70 (140 slots) beat one of 120 only when attention is weighed in
    rows, width = packed.best_packing([70, 50], 120)
    assert width == 120 and len(rows) == 1
    rows, width = packed.best_packing([70, 50], 120, attention_weight=0.01)
    # 1 x 120 x (1 + 1.2) = 264 against 2 x 70 x (1 + 0.7) = 238
    assert width == 70 and len(rows) == 2


def test_attention_weight_from_the_config():
    from types import SimpleNamespace

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=128, intermediate_size=384))
    assert packed.attention_weight(model) == pytest.approx(4 * 128 / (8 * 128 ** 2 + 6 * 128 * 384))
    assert packed.attention_weight(SimpleNamespace()) == 0.0
