"""Padding-free scoring of rollouts: the same log-probs, entropies, values and gradients as padded."""

from __future__ import annotations

import pytest
import torch

from kilter.rollout import scoring
from kilter.rollout.scoring import assemble, token_logprobs, token_values

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14]]
RESPONSES = [[20, 21, 22], [23], [24, 25, 26, 27, 28, 29], []]  # an empty response too


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


def test_layout_selects_the_positions_before_each_response_token():
    batch = assemble([[5, 6], [7]], [[8, 9], [10, 11, 12]], pad_id=0)
    lay = scoring._pack_rollout(batch)
    ids = lay.batch["input_ids"].reshape(-1)
    # each selected position is followed by the response token it predicts
    assert ids[lay.flat + 1].tolist() == lay.targets.tolist()
    assert sorted(lay.targets.tolist()) == [8, 9, 10, 11, 12]
    assert lay.flat.tolist() == sorted(lay.flat.tolist())
    assert int(lay.select.sum()) == 5


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_packed_logprobs_equal_the_padded_ones(micro_lm, temperature):
    tok, model = micro_lm
    model.train()
    batch = assemble(PROMPTS, RESPONSES, tok.pad_token_id)
    assert scoring._fast_policy(model) is not None
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
    assert scoring._fast_critic(critic) is not None
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
