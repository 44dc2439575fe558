"""The update half of `kilter ppo`: advantages per algorithm by hand, accumulation, early stop, ptx."""

import copy
import math

import pytest
import torch

from kilter.ops import gae
from kilter.rollout.scoring import batched_logprobs, batched_values
from kilter.trainers.ppo_update import (
    MovingAverageBaseline,
    PtxStream,
    UpdateSettings,
    compute_advantages,
    run_update,
)

# --------------------------------------------------------------------------- advantages by hand

REWARDS = torch.tensor([[0.1, -0.2, 1.0], [0.5, 0.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


def test_reinforce_reward_to_go_minus_baseline():
    # row 0: G = [0.1 - 0.2 + 1.0, -0.2 + 1.0, 1.0] = [0.9, 0.8, 1.0]; row 1: G = [0.5]
    out = compute_advantages("reinforce", REWARDS, MASK, baseline=torch.tensor([0.4, 0.4]), whiten=False)
    assert torch.allclose(out.advantages, torch.tensor([[0.5, 0.4, 0.6], [0.1, 0.0, 0.0]]))
    assert out.returns is None
    # gamma 0.5: row 0 G = [0.1 + 0.5 * (-0.2 + 0.5 * 1.0), -0.2 + 0.5, 1.0] = [0.25, 0.3, 1.0]
    out = compute_advantages("reinforce", REWARDS, MASK, gamma=0.5, baseline=torch.zeros(2), whiten=False)
    assert torch.allclose(out.advantages[0], torch.tensor([0.25, 0.3, 1.0]))


def _group_rewards():
    # four responses (two prompts x k=2) whose per-token rewards sum to 1, 3, 2, 6
    rewards = torch.tensor([[1.0, 0.0], [1.0, 2.0], [2.0, 0.0], [3.0, 3.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    return rewards, mask


def test_rloo_leave_one_out_per_token():
    rewards, mask = _group_rewards()
    out = compute_advantages("rloo", rewards, mask, group_size=2, whiten=False)
    # k = 2: each baseline is the other sample: [1 - 3, 3 - 1, 2 - 6, 6 - 2]
    assert torch.allclose(out.advantages, torch.tensor([[-2.0, 0.0], [2.0, 2.0], [-4.0, 0.0], [4.0, 4.0]]))
    assert torch.allclose(out.baseline, torch.tensor([3.0, 1.0, 6.0, 2.0]))


def test_grpo_group_standardised_and_whitening_keeps_signs():
    rewards, mask = _group_rewards()
    out = compute_advantages("grpo", rewards, mask, group_size=2, whiten=False)
    # group [1, 3]: mean 2, std sqrt(2) -> -/+ 0.7071; group [2, 6]: mean 4, std sqrt(8) -> -/+ 0.7071
    r = 1 / math.sqrt(2)
    assert torch.allclose(out.advantages, torch.tensor([[-r, 0.0], [r, r], [-r, 0.0], [r, r]]), atol=1e-5)
    whitened = compute_advantages("rloo", rewards, mask, group_size=2, whiten=True).advantages
    plain = compute_advantages("rloo", rewards, mask, group_size=2, whiten=False).advantages
    live = mask.bool()
    assert torch.equal(torch.sign(whitened[live]), torch.sign(plain[live]))  # scale only, no shift
    assert whitened[live].std().item() == pytest.approx(1.0, abs=1e-4)


def test_ppo_and_a2c_use_gae_over_the_critic():
    values = torch.tensor([[0.2, 0.1, 0.4], [0.3, 9.0, 9.0]])
    expected_adv, expected_ret = gae(REWARDS, values, MASK, 1.0, 0.9)
    for algorithm in ("ppo", "a2c"):
        out = compute_advantages(algorithm, REWARDS, MASK, values=values, lam=0.9, whiten=False)
        assert torch.allclose(out.advantages, expected_adv) and torch.allclose(out.returns, expected_ret)
    # by hand for row 1 (one token, terminal): A = r - V = 0.5 - 0.3
    assert out.advantages[1, 0].item() == pytest.approx(0.2)


def test_moving_average_baseline():
    b = MovingAverageBaseline(decay=0.9)
    assert b.current() == 0.0  # no baseline before any batch: never the first batch's own mean
    b.update(1.0)
    assert b.current() == 1.0
    b.update(3.0)  # 0.9 * 1 + 0.1 * 3
    assert b.value == pytest.approx(1.2)
    c = MovingAverageBaseline(0.9)
    c.load_state_dict(b.state_dict())
    assert c.value == pytest.approx(1.2)


# --------------------------------------------------------------------------- the update on a model


@pytest.fixture(scope="module")
def models(micro_ppo_models):
    return micro_ppo_models




def _settings(**kw):
    base = dict(algorithm="ppo", epochs=1, num_minibatches=2, grad_accum=1, clip_range=0.2, clip_range_value=0.2,
                entropy_coef=0.01, target_kl=None, temperature=1.0, precision="fp32", max_grad_norm=None,
                value_max_grad_norm=None)
    base.update(kw)
    return UpdateSettings(**base)


def _prepare(make_rollout, tok, policy, value, algorithm="ppo"):
    batch = make_rollout(tok.pad_token_id)
    old_logp, _ = batched_logprobs(policy, batch, 1.0, 4)
    values = batched_values(value, batch, 4)
    rewards = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1)) * batch.response_mask
    adv = compute_advantages(algorithm, rewards, batch.response_mask, values=values, group_size=2,
                             baseline=torch.zeros(len(batch)))
    return batch, old_logp, values, adv


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "constant"])
def test_grad_accumulation_equals_one_big_step(models, random_rollout, aggregation):
    tok, policy0, value0 = models
    batch, old_logp, values, adv = _prepare(random_rollout, tok, policy0, value0)
    results = []
    for accum in (1, 2):
        policy, value = copy.deepcopy(policy0), copy.deepcopy(value0)
        p_opt = torch.optim.SGD(policy.parameters(), lr=0.5)
        v_opt = torch.optim.SGD(value.parameters(), lr=0.5)
        stats = run_update(policy, value, p_opt, v_opt, batch, old_logp, adv, values,
                           _settings(grad_accum=accum, aggregation=aggregation, normaliser=8.0), seed=0, iteration=0)
        results.append((policy, value, stats))
    (p1, v1, s1), (p2, v2, s2) = results
    # fp32 sums in another order after an lr=0.5 step: ~6e-6 apart on the v3 tiny model's critic; a
    # wrong micro-batch weight would be off by a factor (~1e-2 here), far outside this tolerance
    for a, b in zip(p1.parameters(), p2.parameters()):
        assert torch.allclose(a, b, atol=2e-5)
    for a, b in zip(v1.parameters(), v2.parameters()):
        assert torch.allclose(a, b, atol=2e-5)
    assert s1["loss/policy"] == pytest.approx(s2["loss/policy"], abs=1e-6)
    assert s1["ppo/optimizer_steps"] == 2 and s1["ppo/early_stopped"] == 0
    # the update moved both models away from where they started
    assert any(not torch.equal(a, b) for a, b in zip(p1.parameters(), policy0.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(v1.parameters(), value0.parameters()))


def test_early_stop_on_approximate_kl(models, random_rollout):
    tok, policy0, value0 = models
    batch, old_logp, values, adv = _prepare(random_rollout, tok, policy0, value0)
    policy = copy.deepcopy(policy0)
    opt = torch.optim.SGD(policy.parameters(), lr=5.0)
    stats = run_update(policy, None, opt, None, batch, old_logp, adv, None,
                       _settings(epochs=3, num_minibatches=2, target_kl=1e-6), seed=0, iteration=0)
    # the first minibatch is on-policy (approx KL ~ 0) and is applied; the second already sees the
    # moved policy, exceeds the target and stops the whole update
    assert stats["ppo/optimizer_steps"] == 1 and stats["ppo/early_stopped"] == 1
    assert stats["ppo/epochs"] == 0.5


def test_a2c_and_reinforce_take_one_unclipped_pass(models, random_rollout):
    tok, policy0, value0 = models
    for algorithm in ("a2c", "reinforce"):
        batch, old_logp, values, adv = _prepare(random_rollout, tok, policy0, value0, algorithm)
        policy = copy.deepcopy(policy0)
        opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        critic = copy.deepcopy(value0) if algorithm == "a2c" else None
        v_opt = torch.optim.SGD(critic.parameters(), lr=0.1) if critic is not None else None
        stats = run_update(policy, critic, opt, v_opt, batch, old_logp, adv, values if critic else None,
                           _settings(algorithm=algorithm, epochs=4), seed=0, iteration=0)
        assert stats["ppo/optimizer_steps"] == 2  # one pass of two minibatches, whatever epochs says
        assert stats["policy/clipfrac"] == 0.0
        assert ("loss/value" in stats) == (algorithm == "a2c")


def test_ptx_stream_order_is_reproducible_and_mixes_into_the_loss(models, random_rollout):
    tok, policy0, value0 = models
    examples = [{"input_ids": [10 + i, 20 + i, tok.eos_token_id], "labels": [-100, 20 + i, tok.eos_token_id]}
                for i in range(5)]
    a = PtxStream(examples, batch_size=3, seed=1, pad_id=tok.pad_token_id)
    first = [a.next_batch("cpu")["input_ids"][:, 0].tolist() for _ in range(3)]
    # 9 draws over 5 examples: the first epoch is a permutation of all five
    assert sorted(first[0] + first[1][:2]) == [10, 11, 12, 13, 14]
    b = PtxStream(examples, batch_size=3, seed=1, pad_id=tok.pad_token_id)
    b.position = 3  # resuming after one batch gives the same continuation
    assert [b.next_batch("cpu")["input_ids"][:, 0].tolist() for _ in range(2)] == first[1:]

    batch, old_logp, values, adv = _prepare(random_rollout, tok, policy0, value0, "reinforce")
    policy = copy.deepcopy(policy0)
    stats = run_update(policy, None, torch.optim.SGD(policy.parameters(), lr=0.1), None, batch, old_logp, adv,
                       None, _settings(algorithm="reinforce", ptx_coef=0.5),
                       seed=0, iteration=0, ptx=PtxStream(examples, 2, 0, tok.pad_token_id))
    assert stats["loss/ptx"] > 0


# --------------------------------------------------------------------------- the KL penalty as a loss term


def test_beta_changes_the_step_by_exactly_beta_times_the_kl_term(models, random_rollout):
    """With k3 as a loss, gradient(beta) - gradient(0) = beta * gradient of the KL term alone."""
    from kilter.losses.ppo import kl_penalty_loss
    from kilter.rollout.scoring import token_logprobs

    tok, policy0, value0 = models
    batch, old_logp, values, adv = _prepare(random_rollout, tok, policy0, value0, "grpo")
    g = torch.Generator().manual_seed(5)
    ref_logp = (old_logp + 0.3 * torch.randn(old_logp.shape, generator=g)) * batch.response_mask

    def step_delta(beta: float):
        policy = copy.deepcopy(policy0)
        opt = torch.optim.SGD(policy.parameters(), lr=1.0)
        stats = run_update(policy, None, opt, None, batch, old_logp, adv, None,
                           _settings(algorithm="grpo", num_minibatches=1, entropy_coef=0.0, kl_loss="k3",
                                     fuse_first_pass=False), seed=0, iteration=0, ref_logp=ref_logp, beta=beta)
        return [p0 - p for p0, p in zip(policy0.parameters(), policy.parameters())], stats

    base, s0 = step_delta(0.0)
    with_kl, s1 = step_delta(0.25)
    # the KL term's own gradient on the same (whole-rollout) minibatch
    policy = copy.deepcopy(policy0)
    logp, _ = token_logprobs(policy, batch.select(torch.arange(len(batch))), 1.0)
    sub = batch.select(torch.arange(len(batch)))
    term = kl_penalty_loss(logp, ref_logp[:, :sub.response_mask.shape[1]], sub.response_mask, "k3")
    term.backward()
    assert s1["loss/kl"] == pytest.approx(float(term.detach()), rel=1e-5) and s1["loss/kl"] > 0
    for a, b, p in zip(base, with_kl, policy.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(b - a, 0.25 * p.grad, atol=1e-6, rtol=1e-4)


def test_grpo_advantages_do_not_depend_on_beta():
    from kilter.ops import kl_estimate
    from kilter.trainers.ppo_update import shaped_rewards

    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    logp, ref = -torch.rand(4, 3, generator=g), -torch.rand(4, 3, generator=g)
    scores = torch.tensor([1.0, 1.0, 0.0, 0.0])  # equal scores within each group (0/1 rule rewards)
    kl = kl_estimate(logp, ref, "k3") * mask
    advs = [compute_advantages("grpo", shaped_rewards(scores, kl, mask, beta, "k3"), mask, group_size=2,
                               whiten=False).advantages for beta in (0.001, 0.1)]
    torch.testing.assert_close(advs[0], advs[1])
    assert torch.all(advs[0] == 0)  # equal scores: no advantage at all, whatever the KL ranking
    # k1 stays in the reward (InstructGPT): there beta does change the per-token rewards
    r1, r2 = (shaped_rewards(scores, kl_estimate(logp, ref, "k1") * mask, mask, b, "k1") for b in (0.001, 0.1))
    assert not torch.allclose(r1, r2)


def test_dr_grpo_switches_off_the_std_scaling():
    rewards = torch.tensor([[1.0], [3.0], [2.0], [6.0]])
    mask = torch.ones(4, 1)
    plain = compute_advantages("grpo", rewards, mask, group_size=2, whiten=False, group_std_scale=False)
    torch.testing.assert_close(plain.advantages.flatten(), torch.tensor([-1.0, 1.0, -2.0, 2.0]))
