"""parallel=fsdp (FSDP2) under `torchrun` with 2 processes on CPU/gloo.

Each comparison is between 2 processes x batch B (weights, gradients and optimizer state
sharded) and 1 process x batch 2B: the loss trajectory, the evaluations and the final weights
must agree.  Also: a run resumed from a sharded checkpoint equals the uninterrupted one, the
checkpoint's manifest covers the shards, and final/ is a plain Hugging Face folder.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilter.runs import RunDir, read_metrics, verify_manifest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], procs: int) -> subprocess.Popen:
    if procs == 1:
        cmd = [sys.executable, "-m", "kilter", *args, "threads=1"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), "-m", "kilter", *args]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(procs: dict[str, subprocess.Popen]) -> dict[str, str]:
    logs = {}
    for name, proc in procs.items():
        try:
            logs[name] = proc.communicate(timeout=400)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{name} timed out:\n{proc.communicate()[0][-3000:]}")
        assert proc.returncode == 0, f"{name} failed:\n{logs[name][-3000:]}"
    return logs


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _same_rows(a: list[dict], b: list[dict], keys: tuple[str, ...]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in keys:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_sft_fsdp_two_processes_match_one_and_resume_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    from kilter.data.task import build_task

    task = build_task(seed=4, n_demonstrations=64, n_eval=12)
    train = _write(tmp_path / "train.jsonl", task.demonstrations)
    # 9 held-out rows: the two ranks evaluate 5 and 4 (an uneven number of forwards under FSDP)
    evals = _write(tmp_path / "eval.jsonl", task.eval_demonstrations[:9])
    common = ["sft", f"data.train={train}", f"data.eval={evals}", "data.group_by_length=false", "max_steps=4",
              "log_every=1", "eval_every=2", "save_every=2", "keep_checkpoints=null", "optim.lr=1e-3", "seed=7",
              "n_samples=2", "tensorboard=false", "device=cpu"]
    two, one = tmp_path / "two", tmp_path / "one"
    logs = _finish({"two": _start(common + [f"output_dir={two}", "batch_size=4", "parallel=fsdp"], 2),
                    "one": _start(common + [f"output_dir={one}", "batch_size=8"], 1)})
    assert "samples after training" in logs["two"]  # rank 0 sampled alone from the sharded model
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    _same_rows(rows_one, rows_two, ("loss/sft", "eval/loss"))
    losses = [r["loss/sft"] for r in rows_two if "loss/sft" in r]
    assert losses[-1] < losses[0] - 0.3  # it trained

    # final/ is a plain Hugging Face folder holding the trained weights
    w_one, w_two = _weights(one / "final"), _weights(two / "final")
    assert w_one.keys() == w_two.keys()
    for name, tensor in w_one.items():
        assert torch.allclose(w_two[name], tensor, atol=1e-4), name
    loaded = AutoModelForCausalLM.from_pretrained(two / "final")
    for name, tensor in loaded.state_dict().items():
        if name in w_two:
            assert torch.equal(tensor, w_two[name]), name
    # ... equal to the weights in the last sharded checkpoint
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    step4 = two / "checkpoints" / "step-4"
    dcp_to_torch_save(step4 / "sharded", tmp_path / "step4.pt")
    sharded = torch.load(tmp_path / "step4.pt", weights_only=False)["model"]
    for name, tensor in w_two.items():
        assert torch.equal(sharded[name], tensor), name

    # the manifest covers every rank's shards, and a damaged shard is noticed
    step2 = two / "checkpoints" / "step-2"
    manifest = json.loads((step2 / "manifest.json").read_text())["files"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp", "sharded/__1_0.distcp"} <= set(manifest)
    assert verify_manifest(step2) is None
    assert json.loads((step2 / "trainer_state.json").read_text())["layout"] == "sharded"

    # resume from the step-2 sharded checkpoint: the same trajectory and weights as uninterrupted
    cut = tmp_path / "cut"
    shutil.copytree(two, cut)
    shutil.rmtree(cut / "checkpoints" / "step-4")
    shutil.rmtree(cut / "final")
    damaged = tmp_path / "damaged"
    shutil.copytree(cut, damaged)
    with open(damaged / "checkpoints" / "step-2" / "sharded" / "__1_0.distcp", "r+b") as fh:
        fh.write(b"\0\0\0\0")
    assert RunDir(damaged, writer=False).latest_checkpoint() is None  # step-2 is refused, none older
    logs = _finish({"cut": _start(common + [f"output_dir={cut}", "batch_size=4", "parallel=fsdp", "resume=true"],
                                  2)})
    assert "resumed from" in logs["cut"] and "step 2/4" in logs["cut"]
    _same_rows(rows_two, read_metrics(cut), ("loss/sft", "eval/loss", "optim/grad_norm", "optim/lr"))
    w_cut = _weights(cut / "final")
    for name, tensor in w_two.items():
        assert torch.equal(w_cut[name], tensor), name


@pytest.mark.slow
def test_dpo_lora_fsdp_two_processes_match_one(tmp_path):
    from transformers import AutoModelForCausalLM

    from kilter.data.labeler import SimulatedLabeler
    from kilter.data.task import build_task

    task = build_task(seed=5)
    by_prompt: dict[str, list[str]] = {}
    for d in task.demonstrations:
        by_prompt.setdefault(d["prompt"], []).append(d["completion"])
    prompts = [p for p in by_prompt if len(by_prompt[p]) >= 2][:48]
    pairs = SimulatedLabeler(noise=0.0, seed=0).label_comparisons(prompts, [by_prompt[p][:2] for p in prompts],
                                                                  pairs="adjacent")
    assert len(pairs) >= 41
    train = _write(tmp_path / "pairs.jsonl", pairs[:32])
    evals = _write(tmp_path / "eval.jsonl", pairs[32:41])  # 9: uneven shards
    # LoRA with the adapter-disabled policy as the online reference: the reference forward runs
    # through the sharded model too, and final/ is merged from the gathered weights.
    common = ["dpo", "model=builtin:tiny", f"data.train={train}", f"data.eval={evals}", "lora.enabled=true",
              "lora.r=4", "reference=online", "max_steps=3", "log_every=1", "eval_every=3", "optim.lr=2e-3",
              "seed=3", "samples.n=2", "tensorboard=false", "device=cpu", "data.group_by_length=false"]
    two, one = tmp_path / "two", tmp_path / "one"
    logs = _finish({"two": _start(common + [f"output_dir={two}", "batch_size=4", "parallel=fsdp"], 2),
                    "one": _start(common + [f"output_dir={one}", "batch_size=8"], 1)})
    assert "samples after training" in logs["two"]
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    _same_rows(rows_one, rows_two, ("loss/dpo", "rewards/accuracy", "eval/loss", "eval/rewards/margin"))
    evals_two = [r for r in rows_two if "eval/loss" in r]
    assert evals_two[0]["eval/loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0
    # it learned on its pairs (3 steps of 8 pairs: the 9 held-out pairs are too few to show it; DPO's
    # held-out learning is tests/smoke/test_dpo_smoke.py's job)
    train_two = [r for r in rows_two if "loss/dpo" in r]
    assert train_two[-1]["loss/dpo"] < train_two[0]["loss/dpo"] == pytest.approx(0.6931, abs=1e-3)

    merged = AutoModelForCausalLM.from_pretrained(two / "final")  # merged: loads without peft
    assert not any("lora" in name for name, _ in merged.named_parameters())
    w_one, w_two = _weights(one / "final"), _weights(two / "final")
    assert w_one.keys() == w_two.keys()
    for name, tensor in w_one.items():
        assert torch.allclose(w_two[name], tensor, atol=1e-5), name
