"""The fast sampler reproduces HF: per-step logits, greedy tokens, the sampling distribution, EOS.

Every supported family (Llama, Mistral, Qwen2/3, Gemma/Gemma-2, Phi/Phi-3, GPT-2) is a tiny
random model built from its transformers config class here (offline, ~25K parameters).
"""

from collections import Counter

import pytest
import torch
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from kilter.rollout import fast_decode
from kilter.rollout.generate import SamplingParams, generate_ids, left_pad

V = 97
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, pad_token_id=0)


class StubTokenizer:
    """Just what generate_ids needs: ids of EOS/PAD and a decode."""

    def __init__(self, eos: int, pad: int = 0) -> None:
        self.eos_token_id, self.pad_token_id = eos, pad

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (self.eos_token_id, self.pad_token_id)))


def _randomize(model, seed: int = 0, scale: float = 0.3):
    """Large random weights (and nonzero biases) so logits are far from uniform and every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1 + 0.2 * noise if ("norm" in name or "ln_" in name) and name.endswith("weight") else noise)
    return model.eval()


def make(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=4, tie_word_embeddings=False))
    elif arch == "llama_gqa_tied":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, tie_word_embeddings=True))
    elif arch == "llama_bias":
        model = LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                             rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0}))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**SMALL, num_key_value_heads=2, head_dim=16, sliding_window=4096))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=False))
    elif arch == "qwen3":  # per-head q/k RMSNorms before rope
        model = Qwen3ForCausalLM(Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8))
    elif arch == "gemma":  # sqrt(d)-scaled embedding, (1 + w) norms, tanh-GELU
        model = GemmaForCausalLM(GemmaConfig(**SMALL, num_key_value_heads=1, head_dim=8))
    elif arch == "gemma2":  # caps small enough that tanh bends the numbers; eager attention
        model = Gemma2ForCausalLM(Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8,
                                               attn_logit_softcapping=2.0, final_logit_softcapping=3.0))
    elif arch == "phi":  # parallel block, LayerNorm, partial rotary, q/k LayerNorms, LM-head bias
        model = PhiForCausalLM(PhiConfig(**SMALL, num_key_value_heads=4, qk_layernorm=True))
    elif arch == "phi3":  # fused qkv and gate_up projections
        model = Phi3ForCausalLM(Phi3Config(**SMALL, num_key_value_heads=2, bos_token_id=1, eos_token_id=2))
    elif arch == "gpt2":  # learned absolute positions, Conv1D weights, biases everywhere
        model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           pad_token_id=0, bos_token_id=1, eos_token_id=2))
    else:
        raise ValueError(arch)
    return _randomize(model, seed)


FAMILIES = ["llama", "llama_gqa_tied", "llama_bias", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi", "phi3",
            "gpt2"]


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _lora(model, seed: int = 1, targets: list[str] = LLAMA_TARGETS, **extra):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=targets,
                                                  **extra))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero; a nonzero B makes the delta count
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft_model.eval()


# Sampling tests feed one unpadded prompt, so PAD/EOS ids outside the vocabulary keep every
# sampled token in the response (a sampled PAD would otherwise end it).
NO_SPECIALS = StubTokenizer(eos=-5, pad=-7)
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]


def fast_logits(model, prompts, steps: int, pad: int = 0):
    """Per-step logits (steps, B, V) and greedy tokens of the fast path, EOS disabled."""
    ids, mask = left_pad(prompts, pad, "cpu")
    decoder = fast_decode.prepare(model, ids.shape[1] + steps)
    assert decoder is not None, "the fast path refused a supported model"
    seen = []
    new = decoder.decode(ids, mask, steps, lambda x: x.argmax(-1), eos_id=-1, pad_id=pad,
                         on_logits=lambda rows, logits: seen.append(logits))
    return torch.stack(seen), new


def hf_logits(model, prompts, steps: int, pad: int = 0):
    """Per-step logits of HF generate (greedy, its own KV cache and left-padding handling; PAD suppressed,
    as Kilter never samples it)."""
    ids, mask = left_pad(prompts, pad, "cpu")
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, eos_token_id=None, pad_token_id=pad, output_logits=True,
                         suppress_tokens=[pad],
                         return_dict_in_generate=True, top_k=None, top_p=None, temperature=None)
    return torch.stack(out.logits), out.sequences[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", FAMILIES)
def test_per_step_logits_equal_hf(arch):
    model = make(arch)
    ours, tokens = fast_logits(model, PROMPTS, 5)
    ref, ref_tokens = hf_logits(model, PROMPTS, 5)
    assert ref.std() > 0.5  # far from uniform: a missing bias/norm/rope term would show
    # fp32 rounding grows with the logits (Gemma's scaled embeddings and 1 + w norms reach ~20)
    tol = 1e-5 * max(1.0, float(ref.abs().max()))
    assert torch.allclose(ours, ref, atol=tol, rtol=0), (ours - ref).abs().max()
    assert torch.equal(tokens, ref_tokens)


def test_qwen2_biases_matter():
    """Zeroing Qwen2's q/k/v biases changes the logits: the fused biases are really applied."""
    model = make("qwen2")
    before, _ = fast_logits(model, PROMPTS, 2)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.bias.zero_()
            layer.self_attn.v_proj.bias.zero_()
    after, _ = fast_logits(model, PROMPTS, 2)
    assert (before - after).abs().max() > 1e-2
    assert torch.allclose(after, hf_logits(model, PROMPTS, 2)[0], atol=1e-5, rtol=0)


def test_lora_wrapped_llama_matches_hf_and_respects_disabled_adapter():
    model = _lora(make("llama_gqa_tied"))
    ours, _ = fast_logits(model, PROMPTS, 4)
    ref, _ = hf_logits(model, PROMPTS, 4)
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0), (ours - ref).abs().max()
    with model.disable_adapter():
        base_ours, _ = fast_logits(model, PROMPTS, 4)
        base_ref, _ = hf_logits(model, PROMPTS, 4)
    assert torch.allclose(base_ours, base_ref, atol=1e-5, rtol=0)
    assert (base_ours - ours).abs().max() > 1e-2  # the adapter's delta really was in the first run


@pytest.mark.parametrize("arch, targets", [("gpt2", ["c_attn", "c_proj", "c_fc"]),
                                           ("phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])])
def test_lora_on_fused_and_conv1d_projections_matches_hf(arch, targets):
    """GPT-2's Conv1D weights are stored (in, out): LoRA's delta is added in that layout, then transposed."""
    model = _lora(make(arch), targets=targets, **({"fan_in_fan_out": True} if arch == "gpt2" else {}))
    ours, _ = fast_logits(model, PROMPTS, 3)
    ref, _ = hf_logits(model, PROMPTS, 3)
    assert torch.allclose(ours, ref, atol=1e-5 * max(1.0, float(ref.abs().max())), rtol=0), (ours - ref).abs().max()
    with model.disable_adapter():
        base_ref, _ = hf_logits(model, PROMPTS, 3)
    assert (base_ref - ours).abs().max() > 1e-2  # the adapters' deltas were really applied


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "phi", "gpt2"])
def test_sampled_tokens_logprobs_equal_the_teacher_forced_ones(arch):
    """The log-prob of each sampled token under the sampler's logits is the one a padded forward of
    prompt + response gives (what PPO's scorer computes), so the policy ratio starts at 1."""
    from kilter.models.logprobs import per_token_logps

    model = make(arch)
    steps = 6
    ids, mask = left_pad(PROMPTS, 0, "cpu")
    decoder = fast_decode.prepare(model, ids.shape[1] + steps)
    assert decoder is not None
    seen = []
    torch.manual_seed(0)
    new = decoder.decode(ids, mask, steps, fast_decode.chooser(SamplingParams(temperature=1.0)), eos_id=-1, pad_id=0,
                         on_logits=lambda rows, logits: seen.append(logits))
    sampled = torch.stack([logits.log_softmax(-1) for logits in seen], 1).gather(-1, new[..., None])[..., 0]
    full_ids, ones = torch.cat([ids, new], 1), torch.ones_like(new)
    teacher = per_token_logps(model, full_ids, torch.cat([mask, ones], 1),
                              torch.cat([torch.zeros_like(mask), ones], 1))[:, ids.shape[1] - 1:]
    assert torch.allclose(sampled, teacher, atol=1e-4, rtol=0), (sampled - teacher).abs().max()
    greedy = torch.stack(seen, 1).argmax(-1)
    assert not torch.equal(new, greedy)  # really sampled, not the greedy path


def test_weights_changed_between_calls_are_used():
    model = make("llama")
    before, _ = fast_logits(model, PROMPTS, 3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-2.0)
        model.lm_head.weight[7] += 1.0
    after, _ = fast_logits(model, PROMPTS, 3)
    assert (before - after).abs().max() > 1e-2
    assert torch.allclose(after, hf_logits(model, PROMPTS, 3)[0], atol=1e-5, rtol=0)


def test_bf16_model_is_supported_and_close():
    model = make("llama").to(torch.bfloat16)
    ours, _ = fast_logits(model, PROMPTS, 2)
    ref, _ = hf_logits(model, PROMPTS, 2)
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("arch", ["llama_gqa_tied", "qwen2", "gemma2", "phi", "gpt2"])
def test_greedy_generate_ids_fast_equals_hf(arch, monkeypatch):
    model = make(arch)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]
    probe = generate_ids(model, StubTokenizer(eos=-5), prompts, SamplingParams(max_new_tokens=8, do_sample=False),
                         fast=False)
    rows = probe.response_ids
    # a token some rows produce and others do not, so some rows end early and some run to the limit
    eos = min((t for r in rows for t in r if 0 < sum(t in other for other in rows) < len(rows)),
              key=lambda t: min(r.index(t) for r in rows if t in r))
    tok = StubTokenizer(eos=eos)
    params = SamplingParams(max_new_tokens=8, do_sample=False)
    slow = generate_ids(model, tok, prompts, params, batch_size=3, fast=False)
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("fell back to HF generate"))
    quick = generate_ids(model, tok, prompts, params, batch_size=3, fast=True)
    assert quick.response_ids == slow.response_ids
    assert quick.finished == slow.finished and quick.texts == slow.texts
    assert any(quick.finished) and not all(quick.finished)


def test_eos_ends_rows_and_stops_the_loop(monkeypatch):
    model = make("llama")
    # six rows: the first to end stays in the batch (compaction waits for a quarter), so its
    # later tokens must be replaced by PAD
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16], [20, 21, 22], [30, 31], [40, 41, 42, 43, 44]]
    _, free = fast_logits(model, prompts, 10)  # greedy, EOS disabled
    rows_with = Counter(t for row in free.tolist() for t in set(row))
    eos = max(rows_with, key=lambda t: (rows_with[t], -t))  # the token most rows produce
    first = [row.index(eos) if eos in row else None for row in free.tolist()]
    ends = sorted(f for f in first if f is not None)
    assert len(ends) >= 2 and ends[0] < ends[-1]  # rows end at different steps
    calls = []
    real_forward = fast_decode._forward
    monkeypatch.setattr(fast_decode, "_forward", lambda *a: calls.append(1) or real_forward(*a))
    ids, mask = left_pad(prompts, 0, "cpu")
    decoder = fast_decode.prepare(model, ids.shape[1] + 10)
    out = decoder.decode(ids, mask, 10, lambda x: x.argmax(-1), eos_id=eos, pad_id=0).tolist()
    for row, free_row, cut in zip(out, free.tolist(), first):
        if cut is None:
            assert row == free_row
        else:  # identical up to EOS, pad after it
            assert row == free_row[:cut + 1] + [0] * (10 - cut - 1)
    last_step = 9 if None in first else max(first)
    assert len(calls) == 1 + last_step  # prefill + one forward per step that still had a live row


def test_loop_stops_when_every_row_ended(monkeypatch):
    model = make("llama")
    with torch.no_grad():  # final hidden state 0, so every logit is 0 and greedy picks token 0 = EOS
        model.model.norm.weight.zero_()
    assert fast_decode.prepare(model, 32) is not None  # runs (and caches) the probe before counting
    calls = []
    real_forward = fast_decode._forward
    monkeypatch.setattr(fast_decode, "_forward", lambda *a: calls.append(1) or real_forward(*a))
    gen = generate_ids(model, StubTokenizer(eos=0, pad=1), PROMPTS, SamplingParams(max_new_tokens=16, do_sample=False))
    assert gen.response_ids == [[0], [0], [0]] and gen.finished == [True, True, True]
    assert len(calls) == 1  # the prefill only


def _first_token_probs(model, prompt, temperature=1.0):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    return logits, torch.softmax(logits / temperature, -1)


def test_sampling_distribution_matches_softmax_over_temperature():
    model = make("llama")
    prompt, T, n = [5, 6, 7], 0.7, 6000
    logits, expected = _first_token_probs(model, prompt, T)
    # Precondition: temperature 1 (or any slip in scaling) would be far outside the tolerance.
    assert (torch.softmax(logits, -1) - expected).abs().max() > 0.1
    torch.manual_seed(0)
    gen = generate_ids(model, NO_SPECIALS, [prompt] * n, SamplingParams(max_new_tokens=1, temperature=T),
                       batch_size=n)
    counts = torch.bincount(torch.tensor([r[0] for r in gen.response_ids]), minlength=V).float()
    # Largest binomial std is sqrt(0.25 / n) = 0.0065; 0.03 is more than 4.5 of them.
    assert (counts / n - expected).abs().max() < 0.03
    # Pearson chi-square on bins with expected count >= 5 (others pooled); 99.9% quantile bound.
    big = expected * n >= 5
    exp_bins = torch.cat([expected[big] * n, (expected[~big].sum() * n).view(1)])
    obs_bins = torch.cat([counts[big], counts[~big].sum().view(1)])
    chi2 = float(((obs_bins - exp_bins) ** 2 / exp_bins.clamp(min=1e-9)).sum())
    dof = len(exp_bins) - 1
    assert chi2 < dof + 4.5 * (2 * dof) ** 0.5 + 10


def test_process_logits_top_p_by_hand():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    keep = lambda p: torch.isfinite(fast_decode.process_logits(logits, 1.0, 0, p))[0].tolist()  # noqa: E731
    # ascending mass: 0.05, 0.20, 0.50, 1.0; a token goes while its mass <= 1 - top_p
    assert keep(0.75) == [True, True, False, False]  # 0.5 + 0.3 >= 0.75
    assert keep(0.85) == [True, True, True, False]
    assert keep(0.4) == [True, False, False, False]  # at least the most likely token
    assert keep(1.0) == [True] * 4
    assert keep(1e-12) == [True, False, False, False]  # 1 - top_p rounds to 1.0: the guard keeps one


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.5), (0.5, 3, 0.3),
                                                       (1.0, 0, 0.999)])
def test_process_logits_equals_hf_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 50, generator=g) * 3
    logits[0, :4] = 2.0  # ties at the top
    ref = logits.clone()
    if temperature != 1.0:
        ref = TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    ours = fast_decode.process_logits(logits, temperature, top_k, top_p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    assert torch.equal(ours[torch.isfinite(ours)], ref[torch.isfinite(ref)])
    if top_k and top_p == 1.0:  # top-k alone keeps k tokens, more only on ties (row 0)
        assert (torch.isfinite(ours).sum(-1) >= top_k).all() and torch.isfinite(ours)[1:].sum(-1).eq(top_k).all()


def test_top_p_exactly_at_the_boundary_equals_hf():
    """When the mass of the dropped tail equals 1 - top_p exactly, HF drops it; so do we."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 30, generator=g) * 2
    tail_mass = logits.sort(-1).values.softmax(-1).cumsum(-1)[0, 20]  # float32, HF's own arithmetic
    top_p = 1.0 - float(tail_mass)
    ref = TopPLogitsWarper(top_p)(None, logits.clone())
    ours = fast_decode.process_logits(logits, 1.0, 0, top_p)
    assert torch.isfinite(ref[0]).sum() == 30 - 21  # the 21 least likely tokens, boundary one included
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


@pytest.mark.parametrize("top_k, top_p", [(4, 1.0), (0, 0.6)])
def test_sampled_tokens_stay_in_the_allowed_set(top_k, top_p):
    model = make("llama")
    prompt, T, n = [5, 6, 7], 1.2, 3000
    logits, _ = _first_token_probs(model, prompt)
    allowed_scores = TemperatureLogitsWarper(T)(None, logits[None])
    if top_k:
        allowed_scores = TopKLogitsWarper(top_k)(None, allowed_scores)
    if top_p < 1:
        allowed_scores = TopPLogitsWarper(top_p)(None, allowed_scores)
    allowed = set(torch.isfinite(allowed_scores[0]).nonzero().flatten().tolist())
    assert 2 <= len(allowed) < V // 2
    torch.manual_seed(1)
    gen = generate_ids(model, NO_SPECIALS, [prompt] * n,
                       SamplingParams(max_new_tokens=1, temperature=T, top_k=top_k, top_p=top_p), batch_size=n)
    drawn = {r[0] for r in gen.response_ids}
    assert drawn <= allowed
    probs = torch.softmax(allowed_scores[0], -1)
    assert drawn >= {t for t in allowed if probs[t] > 0.01}  # every plausible allowed token shows up


def test_unsupported_model_falls_back_to_hf_generate():
    torch.manual_seed(0)  # ALiBi attention: no family of the sampler
    model = BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=32, n_layer=1, n_head=2)).eval()
    assert fast_decode.prepare(model, 20) is None
    params = SamplingParams(max_new_tokens=4, do_sample=False)
    tok = StubTokenizer(eos=-5)
    fast = generate_ids(model, tok, PROMPTS, params, fast=True)
    assert fast.response_ids == generate_ids(model, tok, PROMPTS, params, fast=False).response_ids
    assert [len(r) for r in fast.response_ids] == [4, 4, 4]


def test_active_sliding_window_falls_back():
    model = make("mistral")
    model.config.sliding_window = 8
    assert fast_decode.prepare(model, 8) is not None
    assert fast_decode.prepare(model, 9) is None


def test_stop_strings_use_hf_generate_and_train_mode_is_restored(micro_lm, monkeypatch):
    tok, model = micro_lm
    calls = []
    monkeypatch.setattr(fast_decode, "prepare", lambda *a: calls.append(1))
    model.train()
    try:
        gen = generate_ids(model, tok, [[5, 6, 7]], SamplingParams(max_new_tokens=3, stop_strings=["zz"]))
        assert model.training
    finally:
        model.eval()
    assert calls == [] and len(gen.response_ids) == 1


def test_builtin_micro_model_greedy_matches_hf(micro_lm):
    tok, model = micro_lm
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    params = SamplingParams(max_new_tokens=6, do_sample=False)
    assert fast_decode.prepare(model, 11) is not None
    assert generate_ids(model, tok, prompts, params).response_ids == \
        generate_ids(model, tok, prompts, params, fast=False).response_ids


def test_probe_mismatch_marks_the_model_unsupported(monkeypatch):
    model = make("llama", seed=3)
    monkeypatch.setattr(fast_decode, "_rope", lambda x, cos, sin: x)  # a decoder that gets rope wrong
    assert fast_decode.prepare(model, 20) is None
    assert list(fast_decode._VERDICTS[model].values()) == [False]
    monkeypatch.undo()
    assert fast_decode.prepare(model, 20) is None  # the verdict is cached per model object
    params, tok = SamplingParams(max_new_tokens=3, do_sample=False), StubTokenizer(eos=-5)
    assert generate_ids(model, tok, PROMPTS, params).response_ids == \
        generate_ids(model, tok, PROMPTS, params, fast=False).response_ids


@pytest.mark.parametrize("fast", [True, False])
def test_pad_is_never_sampled_even_when_it_is_the_most_likely_token(fast):
    """Make PAD the greedy choice of the first step: neither engine emits it (greedy and sampling)."""
    model = make("llama")
    prompt = [5, 6, 7]
    free = generate_ids(model, NO_SPECIALS, [prompt], SamplingParams(max_new_tokens=4, do_sample=False), fast=fast)
    favourite = free.response_ids[0][0]  # what greedy picks when PAD is out of the vocabulary
    tok = StubTokenizer(eos=-5, pad=favourite)
    greedy = generate_ids(model, tok, [prompt], SamplingParams(max_new_tokens=4, do_sample=False), fast=fast)
    assert len(greedy.response_ids[0]) == 4 and favourite not in greedy.response_ids[0]
    torch.manual_seed(0)
    sampled = generate_ids(model, tok, [prompt] * 200, SamplingParams(max_new_tokens=3, temperature=1.5), fast=fast)
    assert all(len(r) == 3 and favourite not in r for r in sampled.response_ids)
