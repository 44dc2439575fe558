"""The fused first pass of `kilter ppo`: one forward less per iteration, the same training.

With ``update.num_minibatches=1`` and ``update.grad_accum=1`` the update's first step is a
forward over the whole rollout; the trainer runs it before scoring and reads the old
log-probs, entropy and values off it.  Checked here: the detached outputs equal the no-grad
scoring passes, an update from them equals the unfused update (every algorithm, LoRA with
gradient checkpointing and the adapter-disabled reference run in between), and whole runs
give the same weights and metrics with fewer forwards.
"""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main
from kilter.models.lora import LoraSection, apply_lora, enable_gradient_checkpointing
from kilter.models.reference import Reference
from kilter.models.value import TrunkValueHead
from kilter.rollout import scoring
from kilter.rollout.scoring import batched_logprobs, batched_values
from kilter.trainers import ppo_setup
from kilter.trainers.ppo_update import (
    PtxStream,
    UpdateSettings,
    compute_advantages,
    first_pass,
    fuses_first_pass,
    run_update,
)


@pytest.fixture(scope="module")
def models(micro_ppo_models):
    tok, policy, value = micro_ppo_models
    with torch.no_grad():  # a critic that predicts something, so its values and loss are not trivial
        value.score.weight.normal_(0, 0.1)
    return tok, policy, value




def _settings(**kw):
    base = dict(algorithm="ppo", epochs=2, num_minibatches=1, grad_accum=1, clip_range=0.2, clip_range_value=0.2,
                entropy_coef=0.01, target_kl=None, temperature=0.9, precision="fp32", max_grad_norm=1.0,
                value_max_grad_norm=1.0)
    base.update(kw)
    return UpdateSettings(**base)


def _advantages(algorithm, batch, old_logp, values):
    rewards = torch.randn(batch.response_mask.shape, generator=torch.Generator().manual_seed(1))
    rewards = (rewards - 0.1 * old_logp) * batch.response_mask  # depends on old_logp like the KL penalty does
    return compute_advantages(algorithm, rewards, batch.response_mask, values=values, group_size=2,
                              baseline=torch.zeros(len(batch)))


def _ptx(tok):
    examples = [{"input_ids": [10 + i, 20 + i, tok.eos_token_id], "labels": [-100, 20 + i, tok.eos_token_id]}
                for i in range(5)]
    return PtxStream(examples, 2, 0, tok.pad_token_id)


def _assert_same(model_a, model_b):
    for (name, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


def _assert_same_stats(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), key  # fp32 resolves ~6e-8 relative


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "reinforce", "rloo", "grpo"])
def test_fused_update_equals_the_unfused_one(models, algorithm, random_rollout):
    tok, policy0, value0 = models
    batch = random_rollout(tok.pad_token_id)
    s = _settings(algorithm=algorithm, ptx_coef=0.1 if algorithm == "ppo" else 0.0)
    critic = algorithm in ("ppo", "a2c")
    runs = []
    for fused in (False, True):
        policy = copy.deepcopy(policy0)
        value = copy.deepcopy(value0) if critic else None
        # SGD: the steps are the gradients themselves (Adam would blow a 1e-7 rounding difference in a
        # near-zero gradient up to a full learning-rate step, which says nothing about the fusion)
        p_opt = torch.optim.SGD(policy.parameters(), lr=0.1)
        v_opt = torch.optim.SGD(value.parameters(), lr=0.1) if critic else None
        first = None
        if fused:
            first = first_pass(policy, value, batch, s, seed=3, iteration=5)
            old_logp, entropy, values = first.old_logp, first.old_entropy, first.old_values
        else:
            old_logp, entropy = batched_logprobs(policy, batch, s.temperature, 3, with_entropy=True)
            values = batched_values(value, batch, 3) if critic else None
        adv = _advantages(algorithm, batch, old_logp, values)
        stats = run_update(policy, value, p_opt, v_opt, batch, old_logp, adv, values, s, seed=3, iteration=5,
                           ptx=_ptx(tok) if s.ptx_coef else None, first=first)
        runs.append((policy, value, stats, old_logp, entropy, values))
    (p0, v0, s0, lp0, ent0, val0), (p1, v1, s1, lp1, ent1, val1) = runs
    # the detached first pass is what the no-grad scoring passes compute (same layout, 0 on padding)
    assert torch.allclose(lp1, lp0, atol=1e-6) and torch.allclose(ent1, ent0, atol=1e-6)
    assert (lp1[batch.response_mask == 0] == 0).all()
    if critic:
        assert torch.allclose(val1, val0, atol=1e-6)
    _assert_same(p1, p0)
    if critic:
        _assert_same(v1, v0)
    _assert_same_stats(s1, s0)
    assert s1["ppo/optimizer_steps"] == (2 if algorithm in ("ppo", "rloo", "grpo") else 1)
    assert any(not torch.equal(a, b) for a, b in zip(p1.parameters(), policy0.parameters()))


def test_first_step_of_the_fused_pass_is_exactly_on_policy(models, random_rollout):
    """One epoch: the only step reuses the scoring forward, so the ratio is exactly 1."""
    tok, policy0, _ = models
    batch = random_rollout(tok.pad_token_id)
    s = _settings(algorithm="rloo", epochs=1, target_kl=1e-12)
    policy = copy.deepcopy(policy0)
    first = first_pass(policy, None, batch, s, seed=0, iteration=0)
    adv = _advantages("rloo", batch, first.old_logp, None)
    stats = run_update(policy, None, torch.optim.SGD(policy.parameters(), lr=0.1), None, batch, first.old_logp,
                       adv, None, s, seed=0, iteration=0, first=first)
    assert stats["policy/approx_kl"] == 0.0 and stats["policy/clipfrac"] == 0.0
    # even a target KL of 1e-12 cannot stop the first step, which was applied
    assert stats["ppo/early_stopped"] == 0.0 and stats["ppo/optimizer_steps"] == 1
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), policy0.parameters()))


def test_lora_with_checkpointing_and_the_shared_reference_in_between(models, random_rollout):
    """The adapter-disabled reference runs between the fused forward and its backward (as in the trainer).

    With a frozen block, leaving peft's disable_adapter() used to unfreeze its adapters; the
    checkpointed backward then recomputed that block differently and failed.
    """
    tok, policy0, _ = models
    batch = random_rollout(tok.pad_token_id, seed=4)
    s = _settings(algorithm="grpo", epochs=1, num_minibatches=1)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        policy = apply_lora(copy.deepcopy(policy0), LoraSection(enabled=True, r=4))
        with torch.no_grad():
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
        reference = Reference(policy)
        ppo_setup.freeze_lower_layers(policy, 1)  # in the order of ppo_setup.build_models
        enable_gradient_checkpointing(policy)
        policy.eval()
        trainable = [name for name, param in policy.named_parameters() if param.requires_grad]
        assert trainable and not any(".layers.0." in name for name in trainable)
        first = first_pass(policy, None, batch, s, seed=0, iteration=0) if fused else None
        old_logp = first.old_logp if fused else batched_logprobs(policy, batch, s.temperature, 8)[0]
        ref = ppo_setup.reference_logprobs(reference, batch, s.temperature, 8)
        assert [name for name, param in policy.named_parameters() if param.requires_grad] == trainable
        adv = _advantages("grpo", batch, old_logp - ref, None)
        opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.5)
        run_update(policy, None, opt, None, batch, old_logp, adv, None, s, seed=0, iteration=0, first=first)
        runs.append((policy, ref))
    assert torch.allclose(runs[0][1], runs[1][1], atol=1e-6)  # the reference is not the (moved) policy
    assert not torch.allclose(runs[0][1], batched_logprobs(runs[0][0], batch, s.temperature, 8)[0], atol=1e-3)
    _assert_same(runs[1][0], runs[0][0])


def test_fusion_applies_only_to_a_single_whole_rollout_micro_batch(models, random_rollout):
    tok, policy0, _ = models
    batch = random_rollout(tok.pad_token_id)
    assert fuses_first_pass(_settings())
    assert not fuses_first_pass(_settings(fuse_first_pass=False))
    assert not fuses_first_pass(_settings(num_minibatches=2))
    assert not fuses_first_pass(_settings(grad_accum=2))
    with pytest.raises(ValueError, match="num_minibatches"):
        first_pass(policy0, None, batch, _settings(grad_accum=2), seed=0, iteration=0)
    policy = copy.deepcopy(policy0)
    s = _settings(algorithm="grpo")
    first = first_pass(policy, None, batch, s, seed=0, iteration=0)
    adv = _advantages("grpo", batch, first.old_logp, None)
    with pytest.raises(ValueError, match="another iteration"):  # epoch 0 of iteration 1 is shuffled otherwise
        run_update(policy, None, torch.optim.SGD(policy.parameters(), lr=0.1), None, batch, first.old_logp, adv,
                   None, s, seed=0, iteration=1, first=first)


# --------------------------------------------------------------------------- whole runs


def _count_forwards(monkeypatch) -> dict[str, int]:
    """Count policy and critic decoder forwards outside generation (scoring, update, ptx).

    The decoders are hooked because the padding-free scoring path calls them directly; its
    one-off checks run before the hooks go on."""
    counts = {"policy": 0, "critic": 0}
    original = ppo_setup.build_models

    def build_and_hook(cfg, reward, device):
        m = original(cfg, reward, device)

        def on_policy(module, args, kwargs):
            if kwargs.get("use_cache") is False:  # generate runs with the KV cache
                counts["policy"] += 1

        def on_critic(module, args, kwargs):
            counts["critic"] += 1

        scoring._fast_policy(m.policy)
        separate = m.value is not None and not isinstance(m.value, TrunkValueHead)  # trunk: the policy's forward
        if separate:
            scoring._fast_critic(m.value)

        # after the reference was copied, so only the policy's own decoder counts
        m.policy.get_decoder().register_forward_pre_hook(on_policy, with_kwargs=True)
        if separate:
            m.value.model.register_forward_pre_hook(on_critic, with_kwargs=True)
        return m

    monkeypatch.setattr(ppo_setup, "build_models", build_and_hook)
    return counts


def _metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


BASE = ["model=builtin:micro", "iterations=2", "reward.function=builtin:gold", "rollout.max_new_tokens=6",
        "update.num_minibatches=1", "optim.lr=1e-3", "data.eval_prompts=null", "n_samples=0",
        "tensorboard=false", "save_every=2"]
RUNS = {
    # per iteration unfused: 1 scoring + 2 epochs + 2 ptx policy forwards, 1 + 2 critic forwards
    "ppo": (["algorithm=ppo", "rollout.batch_size=4", "update.epochs=2", "update.entropy_coef=0.01",
             "value.optim.lr=1e-3", "ptx.data=builtin:sft", "ptx.coef=0.1", "ptx.batch_size=2"], (5, 3)),
    # per iteration unfused: 1 scoring + 1 epoch policy forwards, no critic
    # value.model=trunk: the same policy forwards give the values, no critic forward at all
    "ppo-trunk": (["algorithm=ppo", "value.model=trunk", "rollout.batch_size=4", "update.epochs=2",
                   "update.entropy_coef=0.01", "value.optim.lr=1e-3", "ptx.data=builtin:sft", "ptx.coef=0.1",
                   "ptx.batch_size=2"], (5, 0)),
    "rloo": (["algorithm=rloo", "rollout.batch_size=2", "rollout.samples_per_prompt=2", "update.epochs=1"], (2, 0)),
}


@pytest.mark.parametrize("algorithm", sorted(RUNS))
def test_fused_run_equals_unfused_run_with_one_forward_less(tmp_path, monkeypatch, algorithm):
    extra, (policy_per_it, critic_per_it) = RUNS[algorithm]
    counts = {}
    for fused in (False, True):
        seen = _count_forwards(monkeypatch)
        out = tmp_path / f"fused-{fused}"
        assert main(["ppo", f"output_dir={out}", *BASE, *extra, f"update.fuse_first_pass={str(fused).lower()}"]) == 0
        counts[fused] = seen
        monkeypatch.undo()
    assert counts[False] == {"policy": 2 * policy_per_it, "critic": 2 * critic_per_it}
    # the fused run skips the no-grad scoring forward of the policy (and the critic) in each of the 2 iterations
    assert counts[True] == {"policy": 2 * (policy_per_it - 1), "critic": 2 * max(critic_per_it - 1, 0)}

    plain, fused = tmp_path / "fused-False", tmp_path / "fused-True"
    names = ["model.safetensors"] + {"ppo": ["value/model.safetensors"],
                                     "ppo-trunk": ["value/critic.safetensors"]}.get(algorithm, [])
    for name in names:
        a, b = load_file(str(plain / "final" / name)), load_file(str(fused / "final" / name))
        assert a.keys() == b.keys()
        for key in a:
            # Float rounding differs between the layouts (the scoring pass packs each chunk on its own),
            # and Adam turns a ~1e-9 difference in a near-zero gradient into a visible step for that
            # element alone: allow a few such elements, but no broad drift.
            diff = (b[key] - a[key]).abs()
            assert float(diff.max()) < 1e-4, f"{name}:{key}"
            assert int((diff > 1e-6).sum()) <= max(2, diff.numel() // 1000), f"{name}:{key}"
    rows_a, rows_b = _metrics(plain), _metrics(fused)
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b):
        assert ra.keys() == rb.keys()
        for key in ra:
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), key
    # and both runs trained: the policy moved away from where it started
    from kilter.models.loading import resolve_model_path

    start = load_file(str(Path(resolve_model_path("builtin:micro")) / "model.safetensors"))
    trained = load_file(str(fused / "final" / "model.safetensors"))
    assert any(not torch.equal(start[k], trained[k]) for k in start)
