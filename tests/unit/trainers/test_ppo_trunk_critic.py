"""``value.model=trunk``: a value head on the policy's own last hidden states, one forward for both.

Checked here: the values are the head applied to the decoder's output at the columns whose
logits give the log-probs (padding-free, shared-prefix and padded paths), read from the very
forward that gives the log-probs (the decoder runs once); the value loss reaches the policy's
LoRA weights scaled by ``vf_coef`` and points downhill; a trunk update runs the decoder once per
micro-batch where the shared-base critic runs it twice; the head saves and loads back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kilter.errors import ConfigError
from kilter.losses import ppo_value_loss
from kilter.models.value import SharedBaseCritic, TrunkValueHead
from kilter.rollout import scoring
from kilter.trainers.ppo_update import UpdateSettings, _micro_step, compute_advantages, first_pass, run_update


def _decoder(policy):
    return policy.get_base_model().get_decoder()


@pytest.fixture
def policy_and_head(micro_policy):
    """(tokenizer, LoRA policy with random B, trunk head with a random weight), both in eval mode."""
    torch.manual_seed(0)
    tok, policy = micro_policy(lora=True)
    policy.eval()
    head = TrunkValueHead(policy)
    with torch.no_grad():
        head.score.weight.copy_(torch.randn(head.score.weight.shape, generator=torch.Generator().manual_seed(3)))
        head.score.bias.fill_(0.25)
    return tok, policy, head


def _batch(tok):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (3, 5, 3, 4)]
    prompts[2] = list(prompts[0])  # two samples of one prompt: the shared-prefix layout applies
    responses = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (4, 2, 6, 3)]
    return scoring.assemble(prompts, responses, tok.pad_token_id)


def _expected_values(policy, head, batch):
    """The head on the decoder's padded output, at column P + t - 1 for response token t."""
    with torch.no_grad():
        hidden = _decoder(policy)(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids).last_hidden_state
    p, r = batch.prompt_width, batch.response_mask.shape[1]
    return head.score(hidden)[:, p - 1:p + r - 1, 0]


class _Count:
    """Counts the forwards of a module while inside."""

    def __init__(self, module):
        self.module, self.n = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda *_: setattr(self, "n", self.n + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_values_are_the_head_on_the_log_probs_own_forward(policy_and_head, path, monkeypatch):
    tok, policy, head = policy_and_head
    batch = _batch(tok)
    if path == "padded":  # the plain forward (a model the padding-free check turned down)
        monkeypatch.setitem(scoring._FAST_POLICY, policy, None)
    else:
        fast = scoring._fast_policy(policy)
        assert fast is not None and fast.shares_prefix  # the shared-prompt layout is what runs
    live = batch.response_mask.bool()
    with _Count(_decoder(policy)) as count:
        logp, entropy, values = scoring.token_scores(policy, batch, 0.9, with_entropy=True, value_head=head)
    assert count.n == 1  # one forward gave log-probs, entropy and values
    want = _expected_values(policy, head, batch)
    assert torch.allclose(values[live], want[live], atol=1e-5)
    assert float(want[live].detach().std()) > 0.1  # the head's values differ per token: the columns matter
    plain_logp, plain_entropy = scoring.token_logprobs(policy, batch, 0.9, with_entropy=True)
    assert torch.allclose(logp[live], plain_logp[live], atol=1e-6)
    assert torch.allclose(entropy[live], plain_entropy[live], atol=1e-6)
    # the chunked no-grad pass of the rollout gives the same, 0 on padding
    b_logp, _, b_values = scoring.batched_scores(policy, batch, 0.9, 3, value_head=head)
    assert torch.allclose(b_values[live], want[live], atol=1e-5) and (b_values[~live] == 0).all()
    assert torch.allclose(b_logp[live], plain_logp[live], atol=1e-6)


def _settings(**kw):
    base = dict(algorithm="ppo", epochs=1, num_minibatches=1, grad_accum=1, clip_range=0.2, clip_range_value=0.2,
                entropy_coef=0.0, target_kl=None, temperature=1.0, precision="fp32", max_grad_norm=None,
                value_max_grad_norm=None)
    base.update(kw)
    return UpdateSettings(**base)


def _rollout(policy, head, batch):
    old_logp, _, values = scoring.batched_scores(policy, batch, 1.0, 8, value_head=head)
    rewards = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1)) * batch.response_mask
    adv = compute_advantages("ppo", rewards, batch.response_mask, values=values)
    return old_logp, adv, values


def _grads(policy, head, batch, old_logp, adv, values, vf_coef, trunk=True):
    policy.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    rows = torch.arange(len(batch))
    stats = _micro_step(policy, head if trunk else None, batch, rows, old_logp, adv, values if trunk else None,
                        _settings(vf_coef=vf_coef), 1.0, value_weight=1.0)
    lora = [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in policy.parameters() if p.requires_grad]
    own = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in head.parameters()]
    return lora, own, stats


def test_the_value_loss_trains_the_lora_weights_scaled_by_vf_coef_and_downhill(policy_and_head):
    tok, policy, head = policy_and_head
    batch = _batch(tok)
    old_logp, adv, values = _rollout(policy, head, batch)
    # returns away from the values, so the value loss and its gradient are not trivial
    adv.returns = adv.returns + torch.linspace(-1, 1, adv.returns.shape[1]) * batch.response_mask
    alone, head_alone, _ = _grads(policy, head, batch, old_logp, adv, values, 0.0, trunk=False)
    zero, head_zero, _ = _grads(policy, head, batch, old_logp, adv, values, 0.0)
    half, head_half, stats = _grads(policy, head, batch, old_logp, adv, values, 0.5)
    one, head_one, _ = _grads(policy, head, batch, old_logp, adv, values, 1.0)
    # vf_coef=0: exactly the policy loss's gradient, and nothing for the head
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(alone, zero))
    assert all(float(g.abs().max()) == 0 for g in head_zero) and all(float(g.abs().max()) == 0 for g in head_alone)
    # the value loss's own gradient, independently: autograd of the value loss alone
    mask = batch.response_mask
    policy.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    with head.reading() as seen:
        policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    p, r = batch.prompt_width, mask.shape[1]
    v = head(seen[0][:, p - 1:p + r - 1])
    v_loss, _ = ppo_value_loss(v, values, adv.returns, mask, 0.2)
    v_loss.backward()
    assert stats["loss/value"] == pytest.approx(float(v_loss.detach()), rel=1e-5)
    lora_v = [p.grad if p.grad is not None else torch.zeros_like(p) for p in policy.parameters() if p.requires_grad]
    assert max(float(g.abs().max()) for g in lora_v) > 1e-4  # it reaches the adapters
    for a, h, o, g in zip(alone, half, one, lora_v):  # policy gradient + vf_coef x value gradient
        tol = 1e-6 * max(1.0, float(g.abs().max()))  # fp32 rounding of gradients up to ~50
        assert torch.allclose(h, a + 0.5 * g, atol=tol) and torch.allclose(o, a + g, atol=tol)
    for h, o, g in zip(head_half, head_one, head.parameters()):
        tol = 1e-6 * max(1.0, float(g.grad.abs().max()))
        assert torch.allclose(h, 0.5 * g.grad, atol=tol) and torch.allclose(o, g.grad, atol=tol)
    # a short step against the value gradient (adapters and head) lowers the value loss by what the
    # gradient predicts (first order: eps x |g|); the step is short because the random head makes the
    # loss sharply curved (at 1e-2 x the unit direction the second-order term already wins)
    params = [p for p in policy.parameters() if p.requires_grad] + list(head.parameters())
    grads = lora_v + [p.grad for p in head.parameters()]
    norm = torch.cat([g.flatten() for g in grads]).norm()
    eps = 1e-4
    with torch.no_grad():
        for param, g in zip(params, grads):
            param -= eps * g / norm
        _, _, after = scoring.token_scores(policy, batch, 1.0, value_head=head)
    later, _ = ppo_value_loss(after, values, adv.returns, mask, 0.2)
    drop = float(v_loss.detach()) - float(later)
    assert drop == pytest.approx(eps * float(norm), rel=0.05) and drop > 1e-3


def test_a_trunk_update_runs_the_decoder_once_per_micro_batch_shared_twice(policy_and_head, micro_policy):
    tok, policy, head = policy_and_head
    batch = _batch(tok)
    s = _settings(num_minibatches=2, epochs=2)
    old_logp, adv, values = _rollout(policy, head, batch)
    opt = torch.optim.SGD([*policy.parameters(), *head.parameters()], lr=0.1)
    before = copy.deepcopy(head.state_dict())
    with _Count(_decoder(policy)) as count:
        stats = run_update(policy, head, opt, None, batch, old_logp, adv, values, s, seed=0, iteration=0)
    assert stats["ppo/optimizer_steps"] == 4 and count.n == 4  # 2 epochs x 2 minibatches, one forward each
    assert not torch.equal(before["score.weight"], head.score.weight)  # the policy's optimizer moved the head
    torch.manual_seed(0)
    _, other = micro_policy(lora=True)
    critic = SharedBaseCritic(other)
    scoring.prepare_fast_paths(other, critic)  # the once-per-model probes, outside the count
    shared_values = scoring.batched_values(critic, batch, 8)
    p_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    v_opt = torch.optim.SGD(critic.parameters(), lr=0.1)
    with _Count(other.get_base_model().get_decoder()) as count:
        run_update(other, critic, p_opt, v_opt, batch, old_logp, adv, shared_values, s, seed=0, iteration=0)
    assert count.n == 8  # the critic's own forward of the same base each step


def test_the_fused_first_pass_reads_values_off_the_policys_forward_and_updates_alike(policy_and_head):
    tok, policy0, head0 = policy_and_head
    batch = _batch(tok)
    s = _settings(epochs=2, entropy_coef=0.01)
    runs = []
    for fused in (False, True):
        policy = copy.deepcopy(policy0)
        head = TrunkValueHead(policy)
        head.load_state_dict(head0.state_dict())
        opt = torch.optim.SGD([*policy.parameters(), *head.parameters()], lr=0.1)
        first = None
        scoring.prepare_fast_paths(policy)  # the once-per-model probes, outside the count
        if fused:
            with _Count(_decoder(policy)) as count:
                first = first_pass(policy, head, batch, s, seed=1, iteration=2)
            assert count.n == 1  # old log-probs, entropy and values: one forward, kept for the first step
            old_logp, values = first.old_logp, first.old_values
        else:
            old_logp, _, values = scoring.batched_scores(policy, batch, 1.0, 8, value_head=head)
        rewards = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1))
        adv = compute_advantages("ppo", rewards * batch.response_mask, batch.response_mask, values=values)
        stats = run_update(policy, head, opt, None, batch, old_logp, adv, values, s, seed=1, iteration=2, first=first)
        runs.append((policy, head, stats, old_logp, values))
    (p0, h0, s0, lp0, v0), (p1, h1, s1, lp1, v1) = runs
    assert torch.allclose(lp1, lp0, atol=1e-6) and torch.allclose(v1, v0, atol=1e-6)
    assert float(v0.abs().max()) > 0.1  # the random head's values, not zeros
    for a, b in zip([*p0.parameters(), *h0.parameters()], [*p1.parameters(), *h1.parameters()]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert s0["loss/value"] == pytest.approx(s1["loss/value"], rel=1e-5)
    assert not torch.equal(h1.score.weight, head0.score.weight)


def test_a_fresh_head_reads_zero_and_save_then_load_restores_it(policy_and_head, tmp_path):
    from kilter.models.saving import load_trainable_weights, save_model

    tok, policy, head = policy_and_head
    batch = _batch(tok)
    save_model(head, None, tmp_path / "value", merge_lora=True)
    assert sorted(f.name for f in (tmp_path / "value").iterdir()) == ["critic.json", "critic.safetensors"]
    fresh = TrunkValueHead(policy)
    assert [n for n, _ in fresh.named_parameters()] == ["score.weight", "score.bias"]  # the policy is not its own
    _, _, zero = scoring.token_scores(policy, batch, 1.0, value_head=fresh)
    assert float(zero.abs().max()) == 0.0  # V = 0 at the start
    load_trainable_weights(fresh, tmp_path / "value")
    live = batch.response_mask.bool()
    with torch.no_grad():
        got = scoring.token_scores(policy, batch, 1.0, value_head=fresh)[2]
        want = scoring.token_scores(policy, batch, 1.0, value_head=head)[2]
    assert torch.equal(got[live], want[live])


def test_full_fine_tuning_is_allowed_and_a_model_without_a_decoder_refused(micro_policy):
    _, plain = micro_policy(lora=False)
    assert TrunkValueHead(plain).score.in_features == plain.get_input_embeddings().weight.shape[1]
    with pytest.raises(ConfigError, match="value.model=trunk .* value.model=policy"):
        TrunkValueHead(nn.Linear(3, 3))


def test_gradient_checkpointing_gives_the_same_values_and_gradients(policy_and_head):
    from kilter.models.lora import enable_gradient_checkpointing

    tok, policy0, head0 = policy_and_head
    batch = _batch(tok)
    grads = []
    for checkpointing in (False, True):
        policy = copy.deepcopy(policy0)
        head = TrunkValueHead(policy)
        head.load_state_dict(head0.state_dict())
        if checkpointing:
            enable_gradient_checkpointing(policy)
        policy.train()  # checkpointing is active in training mode only
        logp, _, values = scoring.token_scores(policy, batch, 1.0, value_head=head)
        ((logp * batch.response_mask).sum() + (values * batch.response_mask).pow(2).sum()).backward()
        grads.append([p.grad.clone() for p in [*policy.parameters(), *head.parameters()] if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 2
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))
