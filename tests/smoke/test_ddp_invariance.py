"""Data parallel: `torchrun` with 2 processes x batch 8 follows 1 process x batch 16 (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from kilter.runs import read_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_with_twice_the_batch(tmp_path):
    from kilter.data.task import build_task

    # Random (not length-grouped) batches: the ranks' shards then hold different numbers of
    # completion tokens, so a per-rank mean instead of a global one would show.
    task = build_task(seed=4, n_demonstrations=256, n_eval=20)
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in task.demonstrations))
    evals.write_text("".join(json.dumps(r) + "\n" for r in task.eval_demonstrations))
    common = ["sft", f"data.train={train}", f"data.eval={evals}", "data.group_by_length=false",
              "max_steps=8", "log_every=1", "eval_every=4", "save_every=8", "optim.lr=1e-3", "seed=7",
              "n_samples=0", "tensorboard=false", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "kilter"]
    two = subprocess.Popen(torchrun + common + [f"output_dir={tmp_path / 'two'}", "batch_size=8"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = subprocess.Popen([sys.executable, "-m", "kilter", *common, f"output_dir={tmp_path / 'one'}",
                            "batch_size=16", "threads=1"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    logs = {}
    for name, proc in (("two", two), ("one", one)):
        try:
            logs[name] = proc.communicate(timeout=400)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name} timed out:\n{proc.communicate()[0][-3000:]}")
        assert proc.returncode == 0, f"{name} failed:\n{logs[name][-3000:]}"

    rows_one, rows_two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    # rank 0 alone writes: exactly one line per logged step and one per evaluation
    assert [r["step"] for r in rows_two if "loss/sft" in r] == list(range(1, 9))
    assert [r["step"] for r in rows_two if "eval/loss" in r] == [4, 8]
    assert [r["step"] for r in rows_one] == [r["step"] for r in rows_two]
    assert "global batch 16" in logs["two"] and "global batch 16" in logs["one"]
    assert logs["two"].count("kilter sft: done") == 1  # rank 1 prints nothing of its own
    for a, b in zip(rows_one, rows_two):
        for key in ("loss/sft", "eval/loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    losses = [r["loss/sft"] for r in rows_one if "loss/sft" in r]
    assert losses[-1] < losses[0] - 0.3  # the comparison is between runs that really trained

    w_one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w_two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name, tensor in w_one.items():
        assert torch.allclose(w_two[name], tensor, atol=1e-4), name
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["step-8"]
