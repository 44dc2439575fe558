"""Data-parallel PPO: two processes with half the rollout each take the step one process takes on all of it.

Two gloo processes on CPU (torch.multiprocessing), replicated (ddp: gradients averaged by
``Ranks.sync_gradients``) and sharded (fsdp: ``fully_shard`` per block).  Whitening, the
minibatch token counts and the gradient average span both processes; a wrong per-process
weight (local instead of global token counts) or a missing average is off by far more than
the fp32 tolerance used here.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from kilter.distributed import DistInfo
from kilter.models.value import TrunkValueHead
from kilter.rollout.scoring import assemble, batched_logprobs, batched_scores, batched_values
from kilter.trainers.ppo_setup import check_data_parallel, local_rows, mean_metrics
from kilter.trainers.ppo_update import UpdateSettings, compute_advantages, run_update
from kilter.training.parallel import Ranks

N = 8  # responses in the rollout: 4 per process


def _rollout(n: int = N, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(10, 200, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    responses = [torch.randint(10, 200, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    rewards = [torch.randn(len(r), generator=g).tolist() for r in responses]
    return prompts, responses, rewards


def _settings(algorithm: str) -> UpdateSettings:
    return UpdateSettings(algorithm=algorithm.removesuffix("-trunk"), epochs=2, num_minibatches=1, grad_accum=2, clip_range=0.2,
                          clip_range_value=0.2, entropy_coef=0.01, target_kl=None, temperature=1.0,
                          precision="fp32", max_grad_norm=1.0, value_max_grad_norm=1.0,
                          kl_loss="k3" if algorithm == "grpo" else None)


def _step(policy, value, prompts, responses, rewards, algorithm: str, ranks: Ranks | None):
    """Score the rollout share, compute advantages and take run_update's steps; returns its stats."""
    # the optimizers first, as the trainer builds them: after a no-grad forward FSDP leaves the groups
    # outside the blocks unsharded, and parameters() would then hand out the temporary full tensors
    critic = value if algorithm.startswith("ppo") else None
    trunk = isinstance(critic, TrunkValueHead)  # ppo-trunk: the head trains with the policy's optimizer
    p_opt = torch.optim.SGD([*policy.parameters(), *(value.parameters() if trunk else ())], lr=0.5)
    v_opt = torch.optim.SGD(value.parameters(), lr=0.5) if critic is not None and not trunk else None
    batch = assemble(prompts, responses, policy.config.pad_token_id or 0)
    mask = batch.response_mask
    token_rewards = torch.zeros_like(mask)
    for i, r in enumerate(rewards):
        token_rewards[i, :len(r)] = torch.tensor(r)
    if trunk:
        old_logp, _, values = batched_scores(policy, batch, 1.0, 4, value_head=critic)
    else:
        old_logp, _ = batched_logprobs(policy, batch, 1.0, 4)
        values = batched_values(critic, batch, 4) if critic is not None else None
    reduce = ranks.sum if ranks is not None and ranks.enabled else None
    adv = compute_advantages(algorithm.removesuffix("-trunk"), token_rewards, mask, values=values, group_size=2, whiten=True, reduce=reduce)
    ref_logp = (old_logp - 0.3 * mask) if algorithm == "grpo" else None
    return run_update(policy, critic, p_opt, v_opt, batch, old_logp, adv, values, _settings(algorithm), seed=0,
                      iteration=0, ref_logp=ref_logp, beta=0.2, ranks=ranks)


def _worker(rank: int, world: int, port: int, algorithm: str, sharded: bool, models: str, out: str) -> None:
    import torch.distributed as dist

    from kilter.rollout.scoring import prepare_fast_paths
    from kilter.training.checkpoint import full_state_dict
    from kilter.training.parallel import wrap_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        info = DistInfo(rank=rank, world_size=world, device="cpu")
        ranks = Ranks(info, sharded=sharded)
        policy, value = torch.load(models, weights_only=False)  # the micro_ppo_models fixture's, pickled
        policy_root, value_root = prepare_fast_paths(policy, None if isinstance(value, TrunkValueHead) else value)
        if sharded:
            class Cfg:
                parallel, precision = "fsdp", "fp32"
            wrap_model(policy_root, policy, Cfg, info)
            wrap_model(value_root, value, Cfg, info)
        prompts, responses, rewards = _rollout()
        share = [local_rows(x, ranks) for x in (prompts, responses, rewards)]
        stats = _step(policy, value, *share, algorithm, ranks)
        stats = mean_metrics({k: v for k, v in stats.items() if not k.startswith("_")}, ranks)
        states = {"policy": full_state_dict(policy), "value": full_state_dict(value)}
        if rank == 0:
            torch.save({"states": states, "stats": stats}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("algorithm,sharded", [("ppo", False), ("grpo", False), ("ppo", True), ("ppo-trunk", False)])
def test_two_processes_with_half_the_rollout_take_the_one_process_step(tmp_path, micro_ppo_models, algorithm,
                                                                      sharded):
    _, policy0, value0 = micro_ppo_models
    if algorithm == "ppo-trunk":  # a value head on the policy's own trunk, its gradients averaged too
        policy0 = copy.deepcopy(policy0)
        value0 = TrunkValueHead(policy0)
        with torch.no_grad():
            value0.score.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    torch.save((policy0, value0), tmp_path / "models.pt")
    policy, value = copy.deepcopy((policy0, value0))  # together: a trunk head keeps its own policy
    one = _step(policy, value, *_rollout(), algorithm, None)

    out = str(tmp_path / "two.pt")
    mp.start_processes(_worker, args=(2, _free_port(), algorithm, sharded, str(tmp_path / "models.pt"), out),
                       nprocs=2, join=True, start_method="spawn")
    two = torch.load(out, weights_only=False)

    moved = max(float((a - b).abs().max()) for a, b in zip(policy.state_dict().values(), policy0.state_dict().values()))
    assert moved > 1e-3  # the step did something
    for name, ref in (("policy", policy), ("value", value)):
        got = two["states"][name]
        for key, tensor in ref.state_dict().items():
            assert torch.allclose(got[key], tensor, atol=2e-5), (name, key, float((got[key] - tensor).abs().max()))
    assert two["stats"]["ppo/optimizer_steps"] == one["ppo/optimizer_steps"] == 2 * 2 / 2 * 1  # epochs x minibatches


def test_local_weighting_alone_would_not_match(micro_ppo_models):
    """The check above can fail: without the global token counts the two-process step is another step."""
    _, policy0, value0 = micro_ppo_models
    prompts, responses, rewards = _rollout()
    full = copy.deepcopy(policy0)
    _step(full, copy.deepcopy(value0), prompts, responses, rewards, "ppo", None)
    # each half on its own (local whitening and local token counts), gradients then averaged by hand
    halves = []
    for part in (slice(0, N // 2), slice(N // 2, N)):
        p = copy.deepcopy(policy0)
        _step(p, copy.deepcopy(value0), prompts[part], responses[part], rewards[part], "ppo", None)
        halves.append(p)
    averaged = {k: (halves[0].state_dict()[k] + halves[1].state_dict()[k]) / 2 for k in full.state_dict()}
    gap = max(float((averaged[k] - v).abs().max()) for k, v in full.state_dict().items())
    assert gap > 1e-3


def test_config_that_cannot_be_split_is_refused_in_one_line():
    from kilter.errors import ConfigError
    from kilter.trainers.ppo_config import PPOConfig

    cfg = PPOConfig.model_validate({"reward": {"function": "builtin:gold"},
                                    "rollout": {"batch_size": 8, "samples_per_prompt": 1},
                                    "update": {"num_minibatches": 2, "grad_accum": 2}})
    check_data_parallel(cfg, 1)
    check_data_parallel(cfg, 2)  # 4 responses each, 2 minibatches of 2 micro-batches
    with pytest.raises(ConfigError, match="rollout.batch_size=8 .* 3 processes"):
        check_data_parallel(cfg, 3)
    with pytest.raises(ConfigError, match="each of the 4 processes holds 2 responses"):
        check_data_parallel(cfg, 4)
    shared = PPOConfig.model_validate({"reward": {"function": "builtin:gold"}, "parallel": "fsdp",
                                       "lora": {"enabled": True}, "value": {"model": "shared"}})
    with pytest.raises(ConfigError, match="value.model=shared .* parallel=fsdp"):
        check_data_parallel(shared, 2)
    check_data_parallel(shared.model_copy(update={"parallel": "ddp"}), 2)
    trunk = PPOConfig.model_validate({"reward": {"function": "builtin:gold"}, "parallel": "fsdp",
                                      "value": {"model": "trunk"}})
    with pytest.raises(ConfigError, match="value.model=trunk .* parallel=fsdp"):
        check_data_parallel(trunk, 2)
    check_data_parallel(trunk.model_copy(update={"parallel": "ddp"}), 2)
    check_data_parallel(trunk.model_copy(update={"algorithm": "rloo"}), 2)  # no critic: value.* unused
    cfg = PPOConfig.model_validate({"reward": {"function": "builtin:gold"},
                                    "rollout": {"engine": "vllm-server", "vllm_url": "http://127.0.0.1:8100"}})
    with pytest.raises(ConfigError, match="rollout.engine=vllm-server under torchrun"):
        check_data_parallel(cfg, 2)


def test_one_process_ranks_change_nothing():
    ranks = Ranks(DistInfo())
    t = torch.tensor([1.0, 2.0])
    assert ranks.sum(t) is t and ranks.gather(t) is t and ranks.mean(3.5) == 3.5
    assert mean_metrics({"a": 1.0}, ranks) == {"a": 1.0}
    assert local_rows([1, 2, 3], ranks) == [1, 2, 3]
