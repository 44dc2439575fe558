"""The distillation teacher's precomputed top-k table (kilter.models.teacher)."""

from __future__ import annotations

import torch

from kilter.data.collate import pad_batch
from kilter.losses.distill import teacher_topk
from kilter.models.lora import LoraSection, apply_lora
from kilter.models.packed import fast_causal_lm
from kilter.models.reference import Reference
from kilter.models.teacher import TEACHER_CACHE, cached_teacher_topk, completion_logits, gather_rows

VOCAB = 40


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def examples(n: int = 5, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(2, VOCAB, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        reply = torch.randint(2, VOCAB, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g).tolist()
        out.append({"input_ids": prompt + reply, "labels": [-100] * len(prompt) + reply})
    return out


def _alone(model, ex: dict, k: int | None):
    batch = pad_batch([ex], 0, keys=("input_ids", "labels"))
    with torch.no_grad():
        return teacher_topk(completion_logits(model, batch, "fp32", "cpu"), k)


def test_table_rows_are_each_examples_tokens_in_order(tmp_path):
    model, data = tiny_llama(), examples()
    table, hit = cached_teacher_topk(tmp_path, "train", Reference(model), data, 0, 2, 8, "fp32", "cpu")
    assert not hit and (tmp_path / TEACHER_CACHE).is_file()
    assert table["offsets"].tolist()[-1] == sum(sum(1 for t in ex["labels"] if t != -100) for ex in data)
    for order in ([0, 1, 2, 3, 4], [3, 0]):
        logps, index, mass = gather_rows(table, order)
        expected = [_alone(model, data[i], 8) for i in order]
        assert torch.allclose(logps, torch.cat([e[0] for e in expected]), atol=1e-5)
        assert torch.equal(index, torch.cat([e[1] for e in expected]))
        assert torch.allclose(mass, torch.cat([e[2] for e in expected]), atol=1e-5)


def test_cache_hits_only_with_the_same_key(tmp_path):
    model, data = tiny_llama(), examples()
    first, _ = cached_teacher_topk(tmp_path, "train", Reference(model), data, 0, 4, 8, "fp32", "cpu")
    again, hit = cached_teacher_topk(tmp_path, "train", Reference(model), data, 0, 4, 8, "fp32", "cpu")
    assert hit and torch.equal(again["logps"], first["logps"])
    _, hit = cached_teacher_topk(tmp_path, "train", Reference(model), data, 0, 4, 4, "fp32", "cpu")
    assert not hit  # another k
    _, hit = cached_teacher_topk(tmp_path, "train", Reference(tiny_llama(seed=3)), data, 0, 4, 4, "fp32", "cpu")
    assert not hit  # another teacher
    full, _ = cached_teacher_topk(tmp_path, "full", Reference(model), data, 0, 4, None, "fp32", "cpu")
    assert full["index"] is None and full["logps"].shape[-1] == VOCAB


def test_completion_only_head_matches_the_full_forward_and_lora_teacher_is_the_base():
    model, data = tiny_llama(), examples()
    batch = pad_batch(data, 0, keys=("input_ids", "labels"))
    wrapper, _ = fast_causal_lm(model, "cpu", packing=False)
    assert wrapper is not None
    with torch.no_grad():
        assert torch.allclose(completion_logits(model, batch, "fp32", "cpu", loss_model=wrapper),
                              completion_logits(model, batch, "fp32", "cpu"), atol=1e-5)
        base = completion_logits(model, batch, "fp32", "cpu")
    policy = apply_lora(model, LoraSection(enabled=True, r=4, alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # the adapter now changes the outputs
    teacher = Reference(policy)
    assert teacher.shares_policy
    with torch.no_grad():
        assert not torch.allclose(completion_logits(policy, batch, "fp32", "cpu"), base, atol=1e-3)
        with teacher.frozen() as frozen:  # the adapter is off inside the block only
            assert torch.allclose(completion_logits(frozen, batch, "fp32", "cpu"), base, atol=1e-5)
        assert not torch.allclose(completion_logits(policy, batch, "fp32", "cpu"), base, atol=1e-3)
