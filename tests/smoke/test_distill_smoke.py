"""kilter distill end to end on the tiny SFT model: KL to the teacher falls, gold rises, resume is exact."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main
from kilter.runs import read_metrics

CONTEXT = Path(__file__).resolve().parents[2] / "configs" / "distill" / "context-reviews.txt"


def _args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", f"model={model}", f"output_dir={out}", "tensorboard=false", "threads=1",
            "data.max_new_tokens=32", *extra]


def test_student_moves_towards_the_teacher_and_gains_gold(sft_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_args(sft_model_dir, out, f"context_file={CONTEXT}", "data.max_train_prompts=160",
                      "data.samples_per_prompt=2", "data.max_eval_prompts=64", "data.eval_samples=2",
                      "batch_size=32", "max_steps=30", "optim.lr=1e-3", "log_every=5", "eval_every=30",
                      "save_every=30")) == 0
    rows = read_metrics(out)
    evals = [r for r in rows if "eval/kl/student_teacher" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] == 30
    # the context helps the teacher (the premise), and the student without it closes most of the gap
    # (+0.073 measured after the built-in task changed in issue 13: the shared 150-step SFT model barely names
    # products yet, so the context's gain is mostly its warmth; it was above 0.1 before; +0.038 since item 7's
    # demonstrations name the product half as often)
    assert first["eval/gold/teacher"] > first["eval/gold/student"] + 0.02
    assert last["eval/kl/student_teacher"] < 0.5 * first["eval/kl/student_teacher"]
    assert last["eval/gold/student"] > first["eval/gold/student"] + 0.05
    losses = [r["loss/distill"] for r in rows if "loss/distill" in r]
    assert losses[-1] < 0.5 * losses[0]
    assert all(0.9 < r["teacher/topk_mass"] <= 1.0 for r in rows if "teacher/topk_mass" in r)
    assert (out / "teacher_topk.pt").is_file() and (out / "final" / "config.json").is_file()


def test_empty_context_with_the_lora_student_as_teacher_gives_zero_loss(sft_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(sft_model_dir, out, "context=''", "lora.enabled=true", "data.eval=null",
                      "data.max_train_prompts=16", "data.samples_per_prompt=2", "batch_size=16", "max_steps=2",
                      "log_every=1")) == 0
    assert "(the adapter-disabled student)" in capsys.readouterr().out  # no second copy of the weights
    losses = [r["loss/distill"] for r in read_metrics(out) if "loss/distill" in r]
    assert len(losses) == 2 and max(abs(v) for v in losses) < 1e-6


def test_resume_equals_the_uninterrupted_run(sft_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = _args(sft_model_dir, out, f"context_file={CONTEXT}", "teacher=online", "kl=reverse", "top_k=16",
                 "data.eval=null", "data.max_train_prompts=24", "data.samples_per_prompt=2", "batch_size=8",
                 "max_steps=8", "save_every=4", "log_every=2", "optim.lr=1e-3")
    assert main(args) == 0
    straight = load_file(str(out / "final" / "model.safetensors"))
    straight_losses = [r["loss/distill"] for r in read_metrics(out) if "loss/distill" in r]
    shutil.rmtree(out / "checkpoints" / "step-8")  # the run died after step 4
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert main([*args, "resume=true"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "at step 4/8" in printed and "loaded from" in printed
    resumed = load_file(str(out / "final" / "model.safetensors"))
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name
    assert [r["loss/distill"] for r in read_metrics(out) if "loss/distill" in r] == straight_losses


@pytest.mark.slow
def test_two_processes_match_one_with_twice_the_batch(tmp_path):
    """torchrun (gloo, 2 x batch 8) follows 1 x batch 16: the per-token KL is normalised over the step."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["distill", "model=builtin:tiny", f"context_file={CONTEXT}", "data.eval=null",
              "data.max_train_prompts=32", "data.samples_per_prompt=2", "data.max_new_tokens=16", "max_steps=4",
              "log_every=1", "save_every=4", "optim.lr=1e-3", "tensorboard=false", "device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(port), "-m", "kilter"]
    runs = {"two": torchrun + common + [f"output_dir={tmp_path / 'two'}", "batch_size=8"],
            "one": [sys.executable, "-m", "kilter", *common, f"output_dir={tmp_path / 'one'}", "batch_size=16",
                    "threads=1"]}
    for name, command in runs.items():
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, f"{name} failed:\n{(proc.stdout + proc.stderr)[-3000:]}"
        assert "global batch 16" in proc.stdout
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two if "loss/distill" in r] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["loss/distill"] == pytest.approx(a["loss/distill"], rel=1e-4), a["step"]
    w_one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w_two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for name, tensor in w_one.items():
        assert torch.allclose(w_two[name], tensor, atol=1e-4), name
