"""`kilter ppo` under `torchrun` with 2 processes on CPU/gloo: parallel=ddp and parallel=fsdp.

Each process samples and learns from half of every iteration's prompts.  Checked: the run
learns (gold rises with the gold reward); ddp (replicated, gradients averaged) and fsdp (policy
and critic sharded) give the same trajectory, since both take the same step from the same
rollouts; a run resumed from a checkpoint equals the uninterrupted one (each process's sampling
RNG is kept); final/ is a plain Hugging Face folder under both.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

# every piece of state that spans processes: adaptive KL, running reward normalisation, ptx,
# a critic, whitening, grad accumulation, evaluation (rank 0) and samples in between
MICRO = ["model=builtin:micro", "reward.function=builtin:gold", "reward.normalize=true", "rollout.batch_size=4",
         "rollout.max_new_tokens=6", "update.num_minibatches=1", "update.grad_accum=2", "update.epochs=2",
         "kl.adaptive=true", "kl.target=0.5", "kl.horizon=50", "ptx.data=builtin:sft", "ptx.coef=0.1",
         "ptx.batch_size=2", "optim.lr=1e-3", "value.optim.lr=1e-3", "optim.schedule=constant",
         "optim.warmup_ratio=0", "value.optim.schedule=constant", "value.optim.warmup_ratio=0", "save_every=2",
         "keep_checkpoints=null", "data.n_eval=2", "eval_every=2", "n_samples=2", "sample_every=1",
         "tensorboard=false", "threads=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "kilter", "ppo", *args]
    proc = subprocess.run(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in rows]


def _close(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), x["step"]
        for key in x:
            if x[key] is None or y[key] is None:  # a metric with nothing to average (e.g. no sample named a product)
                assert x[key] == y[key], (x["step"], key, x[key], y[key])
                continue
            assert y[key] == pytest.approx(x[key], rel=rel, abs=1e-6), (x["step"], key, x[key], y[key])


@pytest.mark.slow
def test_ddp_and_fsdp_agree_and_resume_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    ddp, fsdp, resumed = tmp_path / "ddp", tmp_path / "fsdp", tmp_path / "resumed"
    log = _torchrun(f"output_dir={ddp}", "parallel=ddp", "iterations=4", *MICRO)
    assert "2 processes (parallel=ddp), 2 responses each per iteration" in log
    log = _torchrun(f"output_dir={fsdp}", "parallel=fsdp", "iterations=4", *MICRO)
    assert "reference: frozen copy of the starting policy, sharded over 2 processes" in log
    # the same rollouts and the same step: sharding changes only where the weights live
    _close(_rows(ddp), _rows(fsdp), rel=1e-4)
    assert {r["step"] for r in _rows(ddp)} == {0, 1, 2, 3, 4}
    trainer_state = json.loads((fsdp / "checkpoints" / "step-4" / "trainer_state.json").read_text())
    assert trainer_state["layout"] == "sharded" and trainer_state["world_size"] == 2
    for run in (ddp, fsdp):  # final/ loads as a plain causal LM, the critic beside it
        model = AutoModelForCausalLM.from_pretrained(run / "final")
        assert sum(p.numel() for p in model.parameters()) > 0
        assert (run / "final" / "value" / "model.safetensors").is_file()
    a, b = load_file(str(ddp / "final" / "model.safetensors")), load_file(str(fsdp / "final" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4

    # 2 iterations, stop; resume to 4 (the constant schedule does not depend on the run's length)
    _torchrun(f"output_dir={resumed}", "parallel=ddp", "iterations=2", *MICRO)
    _torchrun(f"output_dir={resumed}", "parallel=ddp", "iterations=4", "resume=true", *MICRO)
    _close(_rows(ddp), _rows(resumed), rel=1e-6)
    state = torch.load(resumed / "checkpoints" / "step-4" / "training_state.pt", weights_only=False)
    assert len(state["extra"]["rank_rng"]) == 2  # each process's sampling stream
    a = load_file(str(ddp / "checkpoints" / "step-4" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step-4" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_learn_with_the_gold_reward(sft_model_dir, tmp_path):
    out = tmp_path / "ppo"
    _torchrun(f"model={sft_model_dir}", f"output_dir={out}", "reward.function=builtin:gold", "iterations=8",
              "rollout.batch_size=32", "rollout.max_new_tokens=32", "update.epochs=2", "update.num_minibatches=2",
              "optim.lr=5e-4", "value.optim.lr=5e-4", "kl.beta=0.05", "data.n_eval=16", "eval_every=8",
              "save_every=8", "tensorboard=false", "n_samples=2", "sample_every=100", "threads=1")
    rows = [r for r in _rows(out) if "reward/total" in r]
    assert len(rows) == 8
    first = sum(r["reward/gold"] for r in rows[:2]) / 2
    last = sum(r["reward/gold"] for r in rows[-2:]) / 2
    assert last > first + 0.25, f"gold did not rise: {first:.3f} -> {last:.3f}"
    assert rows[0]["kl/ref"] == 0.0
