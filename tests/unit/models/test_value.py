"""The shared-base critic: its own adapter and head over the LoRA policy's frozen weights, kept apart."""

from __future__ import annotations

import copy

import pytest
import torch

from kilter import fastpaths
from kilter.errors import ConfigError
from kilter.models import packed
from kilter.models.reward import token_values
from kilter.models.value import SharedBaseCritic
from kilter.rollout import scoring
from kilter.training.optim import OptimConfig, make_optimizer


@pytest.fixture
def policy_and_critic(micro_policy):
    """(tokenizer, LoRA policy with random B, critic whose adapter and head are random too)."""
    torch.manual_seed(0)  # the fixture draws the policy's B with the global generator
    tok, policy = micro_policy(lora=True)
    critic = SharedBaseCritic(policy)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in critic.named_parameters():
            if "lora_B" in name or name.startswith("score"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return tok, policy, critic


def _reference_values(policy, critic, ids, mask):
    """What the critic must compute: a copy of the policy with the critic's weights in its placeholder
    adapter, that adapter active, and the head at every position."""
    twin = copy.deepcopy(policy)
    decoder = twin.get_base_model().get_decoder()
    params = dict(decoder.named_parameters())
    with torch.no_grad():
        for name in critic._names:
            params[name].copy_(critic.adapter[name.replace(".", "__")])
    twin.base_model.set_adapter(critic.adapter_name)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = decoder(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        return critic.score(hidden)[..., 0]


def _batch(tok):
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (3, 5, 3)]
    prompts[2] = list(prompts[0])  # two samples of one prompt: the shared-prefix layout applies
    responses = [torch.randint(10, 200, (n,), generator=g).tolist() for n in (4, 2, 6)]
    return scoring.assemble(prompts, responses, tok.pad_token_id)


def test_only_the_adapter_and_head_are_the_critics_and_the_policy_keeps_its_own(policy_and_critic):
    tok, policy, critic = policy_and_critic
    critic_params = {id(p) for p in critic.parameters()}
    policy_trainable = {id(p) for p in policy.parameters() if p.requires_grad}
    assert critic_params and not critic_params & {id(p) for p in policy.parameters()}
    n_adapter = sum(p.numel() for p in critic.adapter.parameters())
    n_policy_adapter = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert n_adapter == n_policy_adapter  # same rank and targets as the policy's adapter
    assert sum(p.numel() for p in critic.parameters()) == n_adapter + critic.score.weight.numel() + 1
    opt = make_optimizer(policy, OptimConfig())
    assert not {id(p) for g in opt.param_groups for p in g["params"]} & critic_params
    assert {id(p) for g in make_optimizer(critic, OptimConfig()).param_groups for p in g["params"]} == critic_params
    # the critic's forward leaves the policy as it was: adapter, flags, logits
    ids = torch.randint(10, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = policy(input_ids=ids).logits
        critic(input_ids=ids)
        after = policy(input_ids=ids).logits
    assert torch.equal(before, after) and policy.active_adapters == ["default"]
    assert {id(p) for p in policy.parameters() if p.requires_grad} == policy_trainable


def test_values_are_the_critic_adapters_trunk_under_its_head_padded_and_packed(policy_and_critic):
    tok, policy, critic = policy_and_critic
    batch = _batch(tok)
    want = _reference_values(policy, critic, batch.input_ids, batch.attention_mask)
    got = token_values(critic, batch.input_ids, batch.attention_mask)
    mask = batch.attention_mask.bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-5)
    with torch.no_grad():  # the reference is not the policy's own trunk: the critic's adapter matters
        own = policy.get_base_model().get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                                    position_ids=batch.position_ids).last_hidden_state
    assert (critic.score(own)[..., 0][mask] - want[mask]).abs().max() > 1e-2
    fastpaths.configure()
    fast = packed.fast_reward_model(critic, "cpu")
    assert fast is not None and fast.shares_prefix  # packed rows and shared prompts fit the critic too
    grid = scoring.token_values(critic, batch)  # the fast path: one copy of the shared prompt
    p, r = batch.prompt_width, batch.response_mask.shape[1]
    live = batch.response_mask.bool()
    assert torch.allclose(grid[live], want[:, p - 1:p + r - 1][live], atol=1e-5)


def test_a_value_loss_moves_the_critic_only_and_down(policy_and_critic):
    tok, policy, critic = policy_and_critic
    batch = _batch(tok)
    target = torch.linspace(-1.0, 1.0, batch.response_mask.numel()).view_as(batch.response_mask)
    live = batch.response_mask.bool()

    def loss() -> torch.Tensor:
        return ((scoring.token_values(critic, batch) - target)[live] ** 2).mean()

    policy_logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           position_ids=batch.position_ids).logits
    start = loss()
    (start + 0.0 * policy_logits.sum()).backward()  # one backward through both graphs, as PPO makes it
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in policy.parameters())
    grads = [p.grad for p in critic.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().max()) > 0 for g in grads[:-2])  # adapter too
    norm = torch.cat([g.flatten() for g in grads]).norm()
    with torch.no_grad():  # a short step against the gradient
        for p in critic.parameters():
            p -= 1e-2 * p.grad / norm
    assert float(loss()) < float(start) - 1e-4  # the gradient points downhill


def test_a_policy_loss_has_the_same_gradients_with_a_critic_forward_in_between(policy_and_critic):
    tok, policy, critic = policy_and_critic
    ids = torch.randint(10, 200, (2, 9), generator=torch.Generator().manual_seed(1))

    def policy_grads(with_critic: bool) -> list[torch.Tensor]:
        policy.zero_grad()
        logits = policy(input_ids=ids).logits
        extra = critic(input_ids=ids).logits.sum() if with_critic else 0.0
        (logits.logsumexp(-1).mean() + extra).backward()
        return [p.grad.clone() for p in policy.parameters() if p.requires_grad]

    alone, between = policy_grads(False), policy_grads(True)
    assert all(torch.equal(a, b) for a, b in zip(alone, between)) and any(float(a.abs().max()) > 0 for a in alone)


def test_a_fresh_critic_reads_zero_and_save_then_load_restores_it(policy_and_critic, micro_policy, tmp_path):
    from kilter.models.saving import load_trainable_weights, save_model

    tok, policy, critic = policy_and_critic
    ids = torch.randint(10, 200, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    save_model(critic, None, tmp_path / "value", merge_lora=True)
    assert sorted(f.name for f in (tmp_path / "value").iterdir()) == ["critic.json", "critic.safetensors"]
    save_model(policy, None, tmp_path / "policy")  # the policy's checkpoint: its own adapter, no placeholders
    assert not any(p.is_dir() for p in (tmp_path / "policy").iterdir())
    _, other_policy = micro_policy(lora=True)
    fresh = SharedBaseCritic(other_policy)
    other_policy.load_state_dict(policy.state_dict())  # the same policy (placeholders included)
    assert float(token_values(fresh, ids, mask).abs().max()) == 0.0  # zero head: V = 0 at the start
    load_trainable_weights(fresh, tmp_path / "value")
    assert torch.allclose(token_values(fresh, ids, mask), token_values(critic, ids, mask), atol=1e-6)


def test_without_lora_or_with_gradient_checkpointing_it_refuses_in_one_line(micro_policy):
    from kilter.models.lora import enable_gradient_checkpointing

    _, plain = micro_policy(lora=False)
    with pytest.raises(ConfigError, match="set lora.enabled=true"):
        SharedBaseCritic(plain)
    _, lora = micro_policy(lora=True)
    enable_gradient_checkpointing(lora)
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        SharedBaseCritic(lora)
