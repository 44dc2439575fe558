"""PPO with LoRA and ``value.model=shared``: the critic is the policy's frozen base with its own adapter
and head (kilter.models.value), no second model.  It learns, saves beside the policy, and resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main

SHARED = ["lora.enabled=true", "value.model=shared", "tensorboard=false", "threads=1", "n_samples=0"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/smoke/conftest.py


def _train_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/total" in r]


def test_ppo_with_the_shared_critic_raises_gold_and_the_critic_learns(sft_model_dir, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert main(["ppo", f"model={sft_model_dir}", f"output_dir={out}", "reward.function=builtin:gold",
                 "iterations=10", "rollout.batch_size=16", "rollout.max_new_tokens=24", "update.epochs=2",
                 "update.num_minibatches=2", "optim.lr=3e-3", "value.optim.lr=3e-3", "kl.beta=0.05",
                 "data.n_eval=8", "eval_every=10", "save_every=100", *SHARED]) == 0
    assert "critic: policy's frozen base + own LoRA adapter and head" in capsys.readouterr().out
    rows = _train_rows(out)
    gold = [r["reward/gold"] for r in rows]
    value_loss = [r["loss/value"] for r in rows]
    # observed: gold -0.33, -0.29 ... 0.14, 0.11; value loss 0.21, 0.20, 0.26 ... 0.10, 0.07, 0.14
    assert sum(gold[-3:]) / 3 > sum(gold[:2]) / 2 + 0.15
    assert sum(value_loss[-3:]) / 3 < 0.75 * sum(value_loss[:3]) / 3
    assert rows[0]["perf/padding_free_scores"] == 1.0  # the critic takes the packed fast path too
    assert sorted(p.name for p in (out / "final" / "value").iterdir()) == ["critic.json", "critic.safetensors"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # the policy is a plain model, the critic beside it


ARGS = ["model=builtin:micro", "iterations=4", "reward.function=builtin:gold", "rollout.batch_size=4",
        "rollout.max_new_tokens=6", "update.num_minibatches=2", "update.epochs=2", "optim.lr=1e-2",
        "value.optim.lr=1e-2", "save_every=2", "keep_checkpoints=null", "data.n_eval=2", "eval_every=2", *SHARED]


def test_kill_and_resume_restores_the_shared_critic_exactly(tmp_path, ppo_killed_after):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["ppo", f"output_dir={straight}", *ARGS]) == 0
    assert ppo_killed_after([f"output_dir={resumed}", *ARGS], 2) == 130
    step2 = resumed / "checkpoints" / "step-2"
    assert sorted(p.name for p in (step2 / "value").iterdir()) == ["critic.json", "critic.safetensors"]
    assert main(["ppo", f"output_dir={resumed}", *ARGS, "resume=true"]) == 0
    for name in ("adapter_model.safetensors", "value/critic.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step-4" / name))
        b = load_file(str(resumed / "checkpoints" / "step-4" / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} differs after resume"
    start = load_file(str(step2 / "value" / "critic.safetensors"))
    end = load_file(str(straight / "checkpoints" / "step-4" / "value" / "critic.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start if "lora_B" in k)  # the adapter itself trained
