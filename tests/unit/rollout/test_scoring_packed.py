"""Padding-free scoring of rollouts: the same log-probs, entropies, values and gradients as padded."""

from __future__ import annotations

import pytest
import torch

from kilter.rollout import scoring
from kilter.rollout.scoring import assemble, token_logprobs, token_values

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14], [9, 10], [5, 6, 7, 8]]  # two prompts sampled twice
RESPONSES = [[20, 21, 22], [23], [24, 25, 26, 27, 28, 29], [], [30, 31], [20, 33]]  # an empty response too


def _padded(cache, model):
    """Force the padded path for ``model`` for the duration of a call."""
    class Forced:
        def __enter__(self):
            self.saved = cache.get(model, "missing")
            cache[model] = None

        def __exit__(self, *exc):
            if self.saved == "missing":
                del cache[model]
            else:
                cache[model] = self.saved
    return Forced()


def _grads(model):
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return g


def test_plain_layout_selects_the_position_before_each_response_token():
    batch = assemble([[5, 6], [7]], [[8, 9], [10, 11, 12]], pad_id=0)
    lay = scoring._pack_rollout(batch, shared=False)
    ids = lay.input_ids.reshape(-1)
    # each selected position is followed by the response token it predicts
    assert ids[lay.index + 1].tolist() == lay.targets.tolist()
    assert sorted(lay.targets.tolist()) == [8, 9, 10, 11, 12]
    assert lay.attention_mask is None


def test_shared_layout_computes_each_prompt_once():
    # two samples of prompt [5, 6] and one of [7]: 2 + 2 + 3 (first group) + 1 + 1 (second) = 9 slots
    batch = assemble([[5, 6], [5, 6], [7]], [[8, 9], [10, 11, 12], [13]], pad_id=0)
    lay = scoring._pack_rollout(batch, shared=True)
    assert int((lay.input_ids != 0).sum()) == 9
    ids = lay.input_ids.reshape(-1)
    # the prompt's last token predicts both first response tokens: the same index twice
    firsts = lay.index[lay.grid[1] == 0]
    assert sorted(ids[firsts].tolist()) == [6, 6, 7]
    assert lay.targets.tolist() == batch.input_ids[lay.grid[0], batch.prompt_width + lay.grid[1]].tolist()


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_packed_logprobs_equal_the_padded_ones(micro_lm, temperature):
    tok, model = micro_lm
    model.train()
    batch = assemble(PROMPTS, RESPONSES, tok.pad_token_id)
    assert scoring._fast_policy(model) is not None and scoring._fast_policy(model).shares_prefix
    with _padded(scoring._FAST_POLICY, model):
        want, want_ent = token_logprobs(model, batch, temperature, with_entropy=True)
    m = batch.response_mask
    weights = torch.arange(1.0, 1.0 + m.numel()).reshape(m.shape)
    ((want * m * weights).sum() + (want_ent * m).sum()).backward()
    want_grads = _grads(model)
    got, got_ent = token_logprobs(model, batch, temperature, with_entropy=True)
    ((got * m * weights).sum() + (got_ent * m).sum()).backward()
    model.eval()
    assert torch.allclose(got * m, want * m, atol=1e-5)
    assert torch.allclose(got_ent * m, want_ent * m, atol=1e-5)
    assert (got[m == 0] == 0).all()
    diff = _grads(model) - want_grads
    assert float(diff.norm()) <= 1e-5 * float(want_grads.norm())


def test_packed_values_equal_the_padded_ones():
    from kilter.models import load_tokenizer
    from kilter.models.reward import load_reward_backbone, set_reward_bias

    tok = load_tokenizer("builtin:micro")
    torch.manual_seed(0)
    critic = load_reward_backbone("builtin:micro", tok)
    with torch.no_grad():
        critic.score.weight.normal_(0, 1.0)
    set_reward_bias(critic, 0.25)
    critic.train()
    batch = assemble(PROMPTS, RESPONSES, tok.pad_token_id)
    assert scoring._fast_critic(critic) is not None and scoring._fast_critic(critic).shares_prefix
    with _padded(scoring._FAST_CRITIC, critic):
        want = token_values(critic, batch)
    m = batch.response_mask
    (want * m * torch.arange(1.0, 1.0 + m.numel()).reshape(m.shape)).sum().backward()
    want_grads = _grads(critic)
    got = token_values(critic, batch)
    (got * m * torch.arange(1.0, 1.0 + m.numel()).reshape(m.shape)).sum().backward()
    assert torch.allclose(got * m, want * m, atol=1e-5)
    assert float((_grads(critic) - want_grads).norm()) <= 1e-5 * float(want_grads.norm())
    assert float((want * m).abs().sum()) > 0
