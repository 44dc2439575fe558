"""PPO with LoRA and ``value.model=shared``: the critic is the policy's frozen base with its own adapter
and head (kilter.models.value), no second model.  It learns, saves beside the policy, and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/smoke/conftest.py

def test_ppo_with_the_shared_critic_raises_gold_and_the_critic_learns(lora_critic_ppo, capsys):
    out, code, rows = lora_critic_ppo("shared")
    assert code == 0
    assert "critic: policy's frozen base + own LoRA adapter and head" in capsys.readouterr().out
    gold = [r["reward/gold"] for r in rows]
    value_loss = [r["loss/value"] for r in rows]
    # observed: gold -0.33, -0.29 ... 0.14, 0.11; value loss 0.21, 0.20, 0.26 ... 0.10, 0.07, 0.14
    assert sum(gold[-3:]) / 3 > sum(gold[:2]) / 2 + 0.15
    assert sum(value_loss[-3:]) / 3 < 0.75 * sum(value_loss[:3]) / 3
    assert rows[0]["perf/padding_free_scores"] == 1.0  # the critic takes the packed fast path too
    assert sorted(p.name for p in (out / "final" / "value").iterdir()) == ["critic.json", "critic.safetensors"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # the policy is a plain model, the critic beside it

def test_kill_and_resume_restores_the_shared_critic_exactly(tmp_path, ppo_killed_after, lora_critic_resume_args):
    ARGS = lora_critic_resume_args("shared")
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
