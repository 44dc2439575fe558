"""The reference-log-prob helpers shared by DPO, KTO and PPO (kilter.models.reference)."""

from __future__ import annotations

import copy

import pytest
import torch

from kilter.data.collate import pad_batch
from kilter.models.logprobs import per_token_logps, sequence_logps
from kilter.models.lora import LoraSection, apply_lora
from kilter.models.reference import (
    CACHE_FILE,
    Reference,
    cached_sequence_logps,
    model_fingerprint,
    precompute_sequence_logps,
)

VOCAB = 40


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def examples(n: int = 6, seed: int = 1) -> list[dict]:
    """Tokenized examples: a 2-4 token prompt (labels -100) and a 1-5 token response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = int(torch.randint(2, 5, (1,), generator=g))
        r = int(torch.randint(1, 6, (1,), generator=g))
        ids = torch.randint(2, VOCAB, (p + r,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def manual_sequence_logp(model, ex: dict) -> float:
    """log p(response | prompt), one unpadded example, straight from log_softmax."""
    ids = torch.tensor([ex["input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    total = 0.0
    for t, label in enumerate(ex["labels"]):
        if label != -100:
            total += float(logp[t - 1, ids[0, t]])
    return total


def test_sequence_logps_equals_unpadded_manual_sum():
    model = tiny_llama()
    exs = examples()
    batch = pad_batch(exs, pad_id=0, keys=("input_ids", "labels"))
    with torch.no_grad():
        got = sequence_logps(model, batch, "fp32", "cpu")
        mean = sequence_logps(model, batch, "fp32", "cpu", average=True)
    expected = torch.tensor([manual_sequence_logp(model, e) for e in exs], dtype=torch.float64)
    assert got.shape == (len(exs),)
    assert torch.allclose(got.double(), expected, atol=1e-5)
    n_response = torch.tensor([sum(lab != -100 for lab in e["labels"]) for e in exs], dtype=torch.float64)
    assert torch.allclose(mean.double(), expected / n_response, atol=1e-5)


def test_per_token_logps_alignment_mask_and_left_padding():
    model = tiny_llama()
    ex = {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}
    right = pad_batch([ex, {"input_ids": [3, 4], "labels": [-100, 4]}], pad_id=0, keys=("input_ids", "labels"))
    left = pad_batch([ex, {"input_ids": [3, 4], "labels": [-100, 4]}], pad_id=0, keys=("input_ids", "labels"),
                     side="left", pad_values={"labels": -100})
    with torch.no_grad():
        r = per_token_logps(model, right["input_ids"], right["attention_mask"], right["labels"] != -100)
        lp = per_token_logps(model, left["input_ids"], left["attention_mask"], left["labels"] != -100)
        full = torch.log_softmax(model(input_ids=torch.tensor([ex["input_ids"]])).logits[0], -1)
    assert r.shape == (2, 4)
    # entry t is the log-prob of token t + 1: tokens 7, 8, 9 sit at entries 1, 2, 3; the prompt is 0
    assert r[0, 0] == 0
    for t, token in ((1, 7), (2, 8), (3, 9)):
        assert r[0, t] == pytest.approx(float(full[t, token]), abs=1e-5)
    # left padding shifts the columns, not the values (positions come from the attention mask)
    assert torch.allclose(lp.sum(-1), r.sum(-1), atol=1e-5)
    assert r[1, 1:].abs().sum() == 0  # the padding of the short row contributes nothing


def perturb_lora(model) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


def test_lora_disabled_adapter_reference_equals_frozen_copy():
    base = tiny_llama()
    frozen = copy.deepcopy(base)
    policy = apply_lora(base, LoraSection(enabled=True, r=4, alpha=8, target_modules="all-linear"))
    perturb_lora(policy)  # the adapter now changes the outputs
    policy.train()
    ref = Reference(policy)
    assert ref.shares_policy  # no second copy of the weights
    batch = pad_batch(examples(), pad_id=0, keys=("input_ids", "labels"))
    via_adapter_off = ref.sequence_logps(batch, "fp32", "cpu")
    with torch.no_grad():
        via_copy = sequence_logps(frozen, batch, "fp32", "cpu")
        via_policy = sequence_logps(policy, batch, "fp32", "cpu")
    assert torch.allclose(via_adapter_off, via_copy, atol=1e-6)
    assert (via_policy - via_copy).abs().max() > 1e-3  # the adapter is really on for the policy
    assert policy.training  # the reference pass restored the policy's mode
    assert not via_adapter_off.requires_grad
    # the base weights hash the same with or without the LoRA wrapper
    assert model_fingerprint(policy) == model_fingerprint(frozen)


def test_plain_reference_is_a_frozen_copy():
    policy = tiny_llama()
    ref = Reference(policy)
    assert not ref.shares_policy
    batch = pad_batch(examples(), pad_id=0, keys=("input_ids", "labels"))
    before = ref.sequence_logps(batch, "fp32", "cpu")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05)
    after = ref.sequence_logps(batch, "fp32", "cpu")
    assert torch.equal(before, after)
    assert all(not p.requires_grad for p in ref.model.parameters())
    assert model_fingerprint(ref.model) != model_fingerprint(policy)


def test_precomputed_equals_online_and_cache_is_keyed(tmp_path):
    model = tiny_llama()
    ref = Reference(model)
    exs = examples(9)
    online = torch.cat([ref.sequence_logps(pad_batch(exs[i:i + 4], 0, keys=("input_ids", "labels")), "fp32", "cpu")
                        for i in range(0, 9, 4)])
    pre = precompute_sequence_logps(ref, exs, pad_id=0, batch_size=2, precision="fp32", device="cpu")
    assert torch.allclose(pre, online, atol=1e-5)

    first, hit = cached_sequence_logps(tmp_path, "train", ref, exs, 0, 3, "fp32", "cpu")
    assert not hit and (tmp_path / CACHE_FILE).is_file()
    again, hit = cached_sequence_logps(tmp_path, "train", ref, exs, 0, 3, "fp32", "cpu")
    assert hit and torch.equal(first, again)
    # another set name, other data, or other reference weights never reuse the entry
    _, hit = cached_sequence_logps(tmp_path, "eval", ref, exs, 0, 3, "fp32", "cpu")
    assert not hit
    _, hit = cached_sequence_logps(tmp_path, "train", ref, exs[:-1], 0, 3, "fp32", "cpu")
    assert not hit
    other = Reference(tiny_llama(seed=5))
    changed, hit = cached_sequence_logps(tmp_path, "train", other, exs[:-1], 0, 3, "fp32", "cpu")
    assert not hit and not torch.allclose(changed, first[:-1])
