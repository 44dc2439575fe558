"""`kilter ppo rollout.engine=vllm` learns like the default engine, and its log-prob check stays tight."""

from __future__ import annotations

import json

import torch

from kilter.cli import main

COMMON = ["reward.function=builtin:gold", "iterations=8", "rollout.batch_size=32", "rollout.max_new_tokens=32",
          "update.epochs=2", "update.num_minibatches=2", "optim.lr=5e-4", "value.optim.lr=5e-4", "kl.beta=0.05",
          "data.n_eval=16", "eval_every=8", "save_every=8", "threads=1", "tensorboard=false", "n_samples=0"]


def _train_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward/total" in r]


def _gain(rows):
    first = sum(r["reward/gold"] for r in rows[:2]) / 2
    last = sum(r["reward/gold"] for r in rows[-2:]) / 2
    return first, last


def test_ppo_with_vllm_rollouts_learns_like_the_hf_engine(sft_dir, tmp_path):
    runs = {}
    for engine in ("vllm", "hf"):
        out = tmp_path / engine
        assert main(["ppo", f"model={sft_dir}", f"output_dir={out}", f"rollout.engine={engine}",
                     "rollout.vllm_eager=true", *COMMON]) == 0
        runs[engine] = _train_rows(out)
    vllm, hf = runs["vllm"], runs["hf"]
    assert len(vllm) == 8
    v_first, v_last = _gain(vllm)
    h_first, h_last = _gain(hf)
    assert v_last > v_first + 0.25, f"gold did not rise with vLLM rollouts: {v_first:.3f} -> {v_last:.3f}"
    assert h_last > h_first + 0.25, f"gold did not rise with HF rollouts: {h_first:.3f} -> {h_last:.3f}"
    # the same trend within noise: different samples (another RNG), the same learning
    assert abs(v_last - h_last) < 0.25, (v_last, h_last)
    # every iteration's rollout came from the current policy: vLLM's log-probs equal the trainer's
    diffs = [r["rollout/engine_logp_maxdiff"] for r in vllm]
    assert max(diffs) < 1e-3, diffs
    assert "rollout/engine_logp_maxdiff" not in hf[0]  # the hf engine is the policy: nothing to check


def test_grpo_with_lora_and_vllm_rollouts_syncs_the_merged_policy(sft_dir, tmp_path):
    out = tmp_path / "grpo-lora"
    assert main(["ppo", f"model={sft_dir}", f"output_dir={out}", "algorithm=grpo", "rollout.samples_per_prompt=4",
                 "rollout.batch_size=8", "rollout.max_new_tokens=24", "iterations=3", "lora.enabled=true",
                 "optim.lr=5e-3", "update.epochs=1", "update.num_minibatches=1", "reward.function=builtin:gold",
                 "rollout.engine=vllm", "rollout.vllm_eager=true", "data.eval_prompts=null", "save_every=3",
                 "threads=1", "tensorboard=false", "n_samples=0"]) == 0
    rows = _train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert max(r["rollout/engine_logp_maxdiff"] for r in rows) < 1e-3, rows
    # the adapters moved, so iterations 2 and 3 sampled from a merged policy other than pi_0
    from safetensors.torch import load_file

    adapter = load_file(str(next((out / "checkpoints").glob("step-3")) / "adapter_model.safetensors"))
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in adapter.items())
