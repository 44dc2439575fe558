"""Padding-free rows and shared-prefix groups on every supported decoder family give the plain numbers.

Each family is a tiny random model (~25K parameters) built from its transformers config class
here, offline: GPT-2, Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, Phi, Phi-3.  For each, the
once-per-model checks pass (``perf/padding_free``, ``shared_prefix``, their reward-model twins),
and the fast layouts give the padded log-probs, reward scores and gradients.  An architecture
outside them (Bloom's ALiBi, OPT's mask-derived positions) falls back with one WARNING line and
a 0 verdict, and the fallback still computes the right numbers.
"""

from __future__ import annotations

import pytest
import torch
import transformers as hf

from kilter import fastpaths
from kilter.data.collate import pad_batch
from kilter.models import logprobs, packed
from kilter.models.loading import set_dropout
from kilter.models.logprobs import sequence_logps
from kilter.models.reward import raw_scores
from kilter.models.reward_batches import collate_groups

V = 97
IGNORE = -100
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)


def _config(family: str):
    if family == "gpt2":
        return hf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2)
    if family == "gemma2":  # caps small enough that a missing tanh shows; eager attention
        return hf.Gemma2Config(**COMMON, head_dim=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
    if family == "phi":
        return hf.PhiConfig(**COMMON, qk_layernorm=True)
    if family == "phi3":
        return hf.Phi3Config(**COMMON, bos_token_id=1, eos_token_id=2)
    classes = {"llama": hf.LlamaConfig, "mistral": hf.MistralConfig, "qwen2": hf.Qwen2Config,
               "qwen3": hf.Qwen3Config, "gemma": hf.GemmaConfig}
    extra = {"head_dim": 8} if family in ("qwen3", "gemma") else {}
    return classes[family](**COMMON, **extra)


FAMILIES = ["gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3"]


def _randomize(model, seed: int = 0):
    """Large random weights (norm scales near 1) so logits are far from uniform and every term matters;
    dropout off, as Kilter's loader sets it (GPT-2, Phi and OPT configs default to 0.1)."""
    set_dropout(model, 0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            is_scale = ("norm" in name or "ln_" in name) and name.endswith("weight")
            p.copy_(1 + 0.2 * noise if is_scale else noise)
    return model


def make(family: str, kind: str = "lm"):
    torch.manual_seed(0)
    config = _config(family)
    if kind == "lm":
        model = hf.AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels = 1
        model = hf.AutoModelForSequenceClassification.from_config(config)
    return _randomize(model).train()


@pytest.fixture(autouse=True)
def _fresh_verdicts():
    fastpaths.configure(strict=False)
    yield
    fastpaths.configure(strict=False)


def _pairs(gen: torch.Generator) -> list[dict]:
    """Chosen/rejected examples, consecutive members sharing a prompt."""
    out = []
    for n_prompt, n_a, n_b in [(3, 4, 2), (5, 1, 6), (2, 3, 3)]:
        prompt = torch.randint(3, V, (n_prompt,), generator=gen).tolist()
        for n in (n_a, n_b):
            resp = torch.randint(3, V, (n,), generator=gen).tolist()
            out.append({"input_ids": prompt + resp, "labels": [IGNORE] * n_prompt + resp})
    return out


def _grads(model) -> torch.Tensor:
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return g


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_and_shared_prefix_logps_equal_the_padded_ones(family):
    model = make(family)
    wrapper, ok = packed.fast_causal_lm(model, "cpu")
    assert wrapper is not None and ok and wrapper.shares_prefix
    assert fastpaths.record() == {"perf/completion_logits": 1.0, "perf/padding_free": 1.0, "perf/shared_prefix": 1.0}
    examples = _pairs(torch.Generator().manual_seed(1))
    weights = torch.arange(1.0, 1.0 + len(examples))  # distinct weights: a mix-up of examples shows in the grads
    want = sequence_logps(model, pad_batch(examples, 0), "fp32", "cpu")
    (want * weights).sum().backward()
    want_grads = _grads(model)
    assert want.std() > 0.5
    for group_size in (1, 2):  # padding-free rows; then one shared copy of each pair's prompt
        got = logprobs.packed_sequence_logps(wrapper, examples, 0, 24, "fp32", "cpu", group_size=group_size)
        (got * weights).sum().backward()
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (family, group_size, (got - want).abs().max())
        assert float((_grads(model) - want_grads).norm()) <= 1e-4 * float(want_grads.norm())


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_and_shared_prefix_reward_scores_equal_the_padded_ones(family):
    model = make(family, "cls")
    fast = packed.fast_reward_model(model, "cpu")
    assert fast is not None and fast.shares_prefix
    assert fastpaths.record() == {"perf/padding_free_scores": 1.0, "perf/shared_prefix_scores": 1.0}
    gen = torch.Generator().manual_seed(7)
    groups = [{"examples": [{"input_ids": torch.randint(3, V, (n,), generator=gen).tolist()} for n in sizes],
               "pairs": [(0, 1, None), (1, 2, None)]} for sizes in ((5, 9, 3), (4, 4, 11))]
    for g in groups:  # responses of a group share a 3-token prompt
        for ex in g["examples"][1:]:
            ex["input_ids"][:3] = g["examples"][0]["input_ids"][:3]
    padded = collate_groups(groups, 0)
    want = raw_scores(model, padded["input_ids"], padded["attention_mask"])
    want.sum().backward()
    want_grads = _grads(model)
    for shared in (False, True):
        batch = collate_groups(groups, 0, pack_capacity=16, shared_prefix=shared)
        got = fast(batch["input_ids"], batch["position_ids"], batch["last_index"],
                   attention_mask=batch.get("attention_mask"))
        got.sum().backward()
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (family, shared, (got - want).abs().max())
        assert float((_grads(model) - want_grads).norm()) <= 1e-4 * float(want_grads.norm())
    assert want.std() > 0  # distinct scores, so a swapped index would show


def test_gemma2_split_forward_applies_the_logit_cap_and_an_additive_mask():
    """Gemma-2 caps its logits after the head and adds (eager attention) a 4-D mask to the scores:
    without the cap, or with the bool mask as is, the numbers differ -- so both fixes are needed."""
    model = make("gemma2").eval()
    assert model.config._attn_implementation == "eager"
    wrapper, ok = packed.fast_causal_lm(model, "cpu")
    assert ok and wrapper.shares_prefix
    ids = torch.randint(3, V, (1, 9), generator=torch.Generator().manual_seed(0))
    every = torch.ones(1, 8, dtype=torch.bool)
    with torch.no_grad():
        want = model(input_ids=ids).logits[0, :-1]
        capped = wrapper(ids, select=every)
        uncapped = wrapper._head(wrapper._body(input_ids=ids)[0][:, :-1][every])
    assert torch.allclose(capped, want, atol=1e-5)
    assert (uncapped - want).abs().max() > 0.1
    assert float(want.abs().max()) <= 3.0  # the cap (3.0) is in force
    bool_mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    additive = packed.model_attention_mask(model, bool_mask)
    assert additive.dtype == torch.float32 and float(additive.max()) == 0.0 and float(additive.min()) < -1e30
    with torch.no_grad():
        wrong = model.model(input_ids=ids, attention_mask=bool_mask)[0]
        right = model.model(input_ids=ids, attention_mask=additive)[0]
        plain = model.model(input_ids=ids)[0]
    assert torch.allclose(right, plain, atol=1e-5) and (wrong - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["bloom", "opt"])
def test_an_architecture_outside_the_families_falls_back_visibly(arch, capsys):
    """Bloom (ALiBi from the 2-D mask) and OPT (positions from the 2-D mask) ignore position ids: packed
    rows would mix examples.  The check catches it, says so once, and the padded path stays exact."""
    from kilter.rollout import fast_decode

    torch.manual_seed(0)
    if arch == "bloom":
        config = hf.BloomConfig(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)
    else:
        config = hf.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=64, pad_token_id=0, word_embed_proj_dim=32)
    model = _randomize(hf.AutoModelForCausalLM.from_config(config))
    wrapper, ok = packed.fast_causal_lm(model, "cpu")
    assert not ok
    assert fast_decode.prepare(model, 16) is None
    config.num_labels = 1
    assert packed.fast_reward_model(_randomize(hf.AutoModelForSequenceClassification.from_config(config)), "cpu") is None
    verdicts = fastpaths.record()
    assert verdicts["perf/padding_free"] == 0.0 and verdicts["perf/own_sampler"] == 0.0
    assert verdicts["perf/padding_free_scores"] == 0.0
    err = capsys.readouterr().err
    for path in ("padding_free", "own_sampler", "padding_free_scores"):
        assert err.count(f"fast path {path} is off") == 1
    # what the trainers then use: padded rows, which agree with one-at-a-time forwards
    examples = _pairs(torch.Generator().manual_seed(2))
    padded = sequence_logps(model, pad_batch(examples, 0), "fp32", "cpu")
    alone = torch.cat([sequence_logps(model, pad_batch([ex], 0), "fp32", "cpu") for ex in examples])
    assert torch.allclose(padded, alone, atol=1e-4)
