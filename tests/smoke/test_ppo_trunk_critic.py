"""PPO with ``value.model=trunk``: a value head on the policy's own last hidden states, trained through
the policy's one forward and backward (kilter.models.value.TrunkValueHead).  It learns, saves beside the
policy, and resumes exactly (the head's weights and its state in the policy's optimizer)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/smoke/conftest.py

def test_ppo_with_a_value_head_on_the_trunk_raises_gold_and_the_head_learns(lora_critic_ppo, capsys):
    out, code, rows = lora_critic_ppo("trunk")
    assert code == 0
    assert "critic: value head on the policy's trunk (vf_coef=0.1" in capsys.readouterr().out
    gold = [r["reward/gold"] for r in rows]
    values = [r["value/mean"] for r in rows]
    # observed: gold -0.43, -0.43, -0.02 ... 0.04, -0.06, -0.16; value/mean 0, -0.37, -0.42 ... -0.47, -0.23
    assert sum(gold[-3:]) / 3 > sum(gold[:2]) / 2 + 0.15
    assert values[0] == 0.0  # the rollout's values come from the zero head, before any step
    assert rows[0]["reward/total"] < -0.2 and all(v < -0.1 for v in values[1:])  # then they track the returns
    assert all("optim/value_grad_norm" not in r for r in rows)  # one optimizer, one clipped norm
    every = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    decided = {k: v for r in every for k, v in r.items() if k.startswith("perf/padding_free")}
    assert decided == {"perf/padding_free": 1.0}  # the policy's packed forward, read by the head; no critic's
    assert sorted(p.name for p in (out / "final" / "value").iterdir()) == ["critic.json", "critic.safetensors"]
    head = load_file(str(out / "final" / "value" / "critic.safetensors"))
    assert sorted(head) == ["score.bias", "score.weight"] and float(head["score.weight"].abs().max()) > 0
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final")  # the policy is a plain model, the head beside it

def test_kill_and_resume_restores_the_trunk_head_exactly(tmp_path, ppo_killed_after, lora_critic_resume_args):
    ARGS = lora_critic_resume_args("trunk")
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
    assert not torch.equal(start["score.weight"], end["score.weight"])  # the head kept training after step 2
