"""Sampling: every knob pinned, responses cut after the first EOS, bad settings rejected."""

import copy

import pytest
import torch

from kilter.errors import ConfigError
from kilter.rollout.generate import SamplingParams, cut_after_eos, generate_ids, hf_generate_kwargs, left_pad


def test_cut_after_eos_by_hand():
    eos, pad = 1, 0
    assert cut_after_eos([5, 6, 1, 7, 1], eos, pad) == ([5, 6, 1], True)
    assert cut_after_eos([5, 6, 7], eos, pad) == ([5, 6, 7], False)
    assert cut_after_eos([5, 0, 0], eos, pad) == ([5], False)
    assert cut_after_eos([1], eos, pad) == ([1], True)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"temperature": -1.0}, "temperature must be > 0"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplingParams(**kwargs).check()


def test_greedy_ignores_temperature():
    SamplingParams(do_sample=False, temperature=0.0).check()  # no error: greedy has no temperature


def test_model_generation_defaults_cannot_leak_into_sampling(micro_lm):
    """A checkpoint's top_k / repetition_penalty must not change the sampling distribution."""
    tok, base = micro_lm
    model = copy.deepcopy(base)
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 2.0
    ids, mask = left_pad([[5, 6, 7], [8, 9]], tok.pad_token_id, "cpu")
    params = SamplingParams(max_new_tokens=4, temperature=0.7)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, output_logits=True,
                         return_dict_in_generate=True, **hf_generate_kwargs(params, tok.pad_token_id, tok.eos_token_id))
    pad = tok.pad_token_id
    keep = torch.arange(out.scores[0].shape[-1]) != pad
    for processed, raw in zip(out.scores, out.logits):
        # the processed scores are exactly the raw logits / temperature: no top-k, no penalty;
        # only PAD is removed (it is never sampled)
        assert torch.isneginf(processed[:, pad]).all()
        assert torch.isfinite(processed[:, keep]).all()
        assert torch.allclose(processed[:, keep], raw[:, keep] / 0.7, atol=1e-5)
    # ...while an explicit top_k does apply
    params_k = SamplingParams(max_new_tokens=2, temperature=1.0, top_k=5)
    out = model.generate(input_ids=ids, attention_mask=mask, output_scores=True, return_dict_in_generate=True,
                         **hf_generate_kwargs(params_k, tok.pad_token_id, tok.eos_token_id))
    assert (torch.isfinite(out.scores[0]).sum(-1) == 5).all()
    assert torch.isneginf(out.scores[0][:, pad]).all()


def test_generate_ids_cuts_after_first_eos(micro_lm):
    tok, model = micro_lm
    torch.manual_seed(1)
    gen = generate_ids(model, tok, [[5, 6, 7]] * 16, SamplingParams(max_new_tokens=6, temperature=1.5), batch_size=5)
    assert len(gen.response_ids) == 16 and len(gen.texts) == 16
    for resp, done in zip(gen.response_ids, gen.finished):
        assert tok.pad_token_id not in resp
        assert resp.count(tok.eos_token_id) == (1 if done else 0)
        if done:
            assert resp[-1] == tok.eos_token_id
        else:
            assert len(resp) == 6
    # the same seed samples the same responses (rollouts are reproducible)
    torch.manual_seed(1)
    again = generate_ids(model, tok, [[5, 6, 7]] * 16, SamplingParams(max_new_tokens=6, temperature=1.5), batch_size=5)
    assert again.response_ids == gen.response_ids
