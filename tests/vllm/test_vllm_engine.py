"""The colocated vLLM engine against the trainer's own model: greedy tokens, log-probs, weight sync, LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from kilter.rollout.engine import engine_logp_maxdiff, make_engine
from kilter.rollout.generate import SamplingParams, generate_ids
from kilter.rollout.scoring import assemble, batched_logprobs
from kilter.rollout.vllm_engine import VLLMEngine

GREEDY = SamplingParams(max_new_tokens=24, do_sample=False)


@pytest.fixture(scope="module")
def policy(sft_dir):
    from kilter.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(sft_dir))
    return tok, load_causal_lm(str(sft_dir), tok).eval()


@pytest.fixture(scope="module")
def engine(sft_dir, policy):
    """vLLM's compiled default, as users run it, in this process; closed after the module."""
    tok, model = policy
    eng = make_engine("vllm", model, tok, model_path=str(sft_dir), max_model_len=256)
    assert isinstance(eng, VLLMEngine) and eng.in_process
    yield eng
    eng.close()


@pytest.fixture
def synced(engine, policy):
    """The engine holding the SFT policy's weights again, whatever an earlier test pushed."""
    engine.sync_weights(policy[1])
    return engine


def _hf_greedy(model, tok, ids):
    return generate_ids(model, tok, ids, GREEDY, fast=False).response_ids


def test_greedy_equals_hf_generate_and_kilters_sampler(synced, policy, eval_prompt_ids):
    tok, model = policy
    got = synced.generate(eval_prompt_ids, GREEDY)
    assert got.response_ids == _hf_greedy(model, tok, eval_prompt_ids)
    assert got.response_ids == generate_ids(model, tok, eval_prompt_ids, GREEDY, fast=True).response_ids
    assert all(len(set(r)) > 3 for r in got.response_ids)  # a trained policy, not one repeated token
    assert any(got.finished) and got.texts[0] == tok.decode(got.response_ids[0], skip_special_tokens=True)


def test_sampled_log_probs_equal_the_trainers_teacher_forced_log_softmax(synced, policy, eval_prompt_ids):
    tok, model = policy
    params = SamplingParams(max_new_tokens=24, temperature=0.7)
    ids = eval_prompt_ids * 2
    torch.manual_seed(3)
    gen = synced.generate(ids, params)
    batch = assemble(ids, gen.response_ids, tok.pad_token_id)
    logp, _ = batched_logprobs(model, batch, params.temperature, 64, "fp32")
    diff = engine_logp_maxdiff(gen, logp, batch.response_mask)
    assert diff is not None and diff < 1e-4, diff
    assert tok.pad_token_id not in {t for r in gen.response_ids for t in r}
    # torch's seed fixes vLLM's samples (drawn per request from torch's RNG), and they vary with it
    torch.manual_seed(3)
    assert synced.generate(ids, params).response_ids == gen.response_ids
    torch.manual_seed(4)
    assert synced.generate(ids, params).response_ids != gen.response_ids
    # a wrong weight sync is what the check is there to see
    shifted = [[x - 0.5 for x in row] for row in gen.extras["logprobs"]]
    gen.extras["logprobs"] = shifted
    assert engine_logp_maxdiff(gen, logp, batch.response_mask) == pytest.approx(0.5, abs=1e-4)


def _ppo_update(model, tok, engine, prompt_ids):
    """One REINFORCE/PPO update of ``model`` through Kilter's update loop, on a rollout from ``engine``."""
    from kilter.trainers.ppo_update import UpdateSettings, compute_advantages, run_update

    torch.manual_seed(0)
    gen = engine.generate(prompt_ids * 2, SamplingParams(max_new_tokens=24))
    batch = assemble(prompt_ids * 2, gen.response_ids, tok.pad_token_id)
    old_logp, _ = batched_logprobs(model, batch, 1.0, 64, "fp32")
    # reward: shorter is better -- any signal that moves the policy will do
    scores = -batch.response_mask.sum(1)
    token_rewards = torch.zeros_like(batch.response_mask)
    last = (batch.response_mask.sum(1).long() - 1).clamp(min=0)
    token_rewards[torch.arange(len(last)), last] = scores
    adv = compute_advantages("reinforce", token_rewards, batch.response_mask,
                             baseline=torch.full((len(last),), float(scores.mean())))
    settings = UpdateSettings(algorithm="reinforce", epochs=1, num_minibatches=1, grad_accum=1, clip_range=0.2,
                              clip_range_value=0.2, entropy_coef=0.0, target_kl=None, temperature=1.0,
                              precision="fp32", max_grad_norm=None, value_max_grad_norm=None, fuse_first_pass=False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for it in range(3):
        run_update(model, None, opt, None, batch, old_logp, adv, None, settings, seed=0, iteration=it)
    model.eval()


def test_after_a_ppo_update_the_engine_samples_from_the_new_weights(synced, policy, eval_prompt_ids):
    tok, model = policy
    trained = copy.deepcopy(model)
    before = synced.generate(eval_prompt_ids, GREEDY).response_ids
    _ppo_update(trained, tok, synced, eval_prompt_ids)
    new_greedy = _hf_greedy(trained, tok, eval_prompt_ids)
    assert new_greedy != before, "the update did not change the greedy answers: the test would prove nothing"
    assert synced.generate(eval_prompt_ids, GREEDY).response_ids == before  # not synced yet
    synced.sync_weights(trained)
    assert synced.generate(eval_prompt_ids, GREEDY).response_ids == new_greedy
    synced.sync_weights(trained)  # a second reload works too (the old load_weights route failed here)
    assert synced.generate(eval_prompt_ids, GREEDY).response_ids == new_greedy


def test_a_lora_policy_is_merged_before_syncing_and_its_adapters_are_left_alone(synced, policy, eval_prompt_ids):
    from kilter.models.lora import LoraSection, apply_lora

    tok, model = policy
    lora = apply_lora(copy.deepcopy(model), LoraSection(enabled=True))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    lora.eval()
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    expected = _hf_greedy(lora, tok, eval_prompt_ids)
    assert expected != _hf_greedy(model, tok, eval_prompt_ids)  # the adapters matter
    synced.sync_weights(lora)
    assert synced.generate(eval_prompt_ids, GREEDY).response_ids == expected
    assert all(torch.equal(state[k], v) for k, v in lora.state_dict().items())  # nothing merged in place
    torch.manual_seed(0)
    gen = synced.generate(eval_prompt_ids, SamplingParams(max_new_tokens=16))
    batch = assemble(eval_prompt_ids, gen.response_ids, tok.pad_token_id)
    logp, _ = batched_logprobs(lora, batch, 1.0, 64, "fp32")
    assert engine_logp_maxdiff(gen, logp, batch.response_mask) < 1e-4

