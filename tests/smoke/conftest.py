"""Shared fixtures for smoke runs: one tiny SFT model trained once per session.

Only append fixtures here; several test modules share this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory) -> Path:
    """final/ of a short `kilter sft` run of the built-in tiny model on the built-in task."""
    from kilter.cli import main

    out = tmp_path_factory.mktemp("sft-shared") / "run"
    code = main(["sft", f"output_dir={out}", "max_steps=150", "optim.lr=2e-3", "n_samples=0",
                 "eval_every=1000", "save_every=1000", "log_every=25", "tensorboard=false"])
    assert code == 0
    return out / "final"


@pytest.fixture(scope="session")
def sim_labels_dir(sft_model_dir, tmp_path_factory) -> Path:
    """`kilter label` output for the shared SFT model: K=4 samples per prompt, simulated labels.

    Train files (noise 0.3): comparisons.jsonl, rankings.jsonl, thumbs.jsonl, samples.jsonl on 96
    training prompts; eval_comparisons.jsonl / eval_rankings.jsonl on 32 held-out prompts,
    labeled by the gold preference itself (noise 0).
    """
    from kilter.cli import main

    out = tmp_path_factory.mktemp("labels-shared") / "labels"
    code = main(["label", f"model={sft_model_dir}", f"output_dir={out}", "k=4", "n_prompts=96",
                 "n_eval_prompts=32", "max_new_tokens=40", "seed=0"])
    assert code == 0
    return out


@pytest.fixture(autouse=True)
def _restore_threads():
    """Runs pass threads=1 (tiny models on a busy CPU); keep that from leaking into later tests."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def ppo_killed_after(monkeypatch):
    """``run(args, iteration)``: `kilter ppo ARGS`, killed (KeyboardInterrupt) right after checkpoint ``iteration``."""
    from kilter.cli import main
    from kilter.trainers import ppo_setup

    def run(args: list[str], iteration: int) -> int:
        original = ppo_setup.LoopState.save

        def save_then_die(self, run_dir, it, *rest, **kwargs):
            original(self, run_dir, it, *rest, **kwargs)
            if it == iteration:
                raise KeyboardInterrupt  # killed right after the checkpoint was written

        monkeypatch.setattr(ppo_setup.LoopState, "save", save_then_die)
        try:
            return main(["ppo", *args])
        finally:
            monkeypatch.undo()

    return run


def _lora_critic(value_model: str) -> list[str]:
    return ["lora.enabled=true", f"value.model={value_model}", "tensorboard=false", "threads=1", "n_samples=0"]


@pytest.fixture
def lora_critic_ppo(sft_model_dir, tmp_path):
    """``run(value_model)``: 10 PPO iterations on the shared SFT model with LoRA and that critic
    (value.model=shared|trunk), against the gold reward; returns (run dir, exit code, training rows)."""
    import json

    from kilter.cli import main

    def run(value_model: str):
        out = tmp_path / "ppo"
        code = main(["ppo", f"model={sft_model_dir}", f"output_dir={out}", "reward.function=builtin:gold",
                     "iterations=10", "rollout.batch_size=16", "rollout.max_new_tokens=24", "update.epochs=2",
                     "update.num_minibatches=2", "optim.lr=3e-3", "value.optim.lr=3e-3", "kl.beta=0.05",
                     "data.n_eval=8", "eval_every=10", "save_every=100", *_lora_critic(value_model)])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if code == 0 else []
        return out, code, [r for r in rows if "reward/total" in r]

    return run


@pytest.fixture
def lora_critic_resume_args():
    """``args(value_model)``: a 4-iteration micro-model PPO run with a LoRA critic, checkpoints at 2 and 4."""
    def args(value_model: str) -> list[str]:
        return ["model=builtin:micro", "iterations=4", "reward.function=builtin:gold", "rollout.batch_size=4",
                "rollout.max_new_tokens=6", "update.num_minibatches=2", "update.epochs=2", "optim.lr=1e-2",
                "value.optim.lr=1e-2", "save_every=2", "keep_checkpoints=null", "data.n_eval=2", "eval_every=2",
                *_lora_critic(value_model)]

    return args
