"""Kill and resume: continuing from the last checkpoint ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kilter.cli import main
from kilter.runs import read_metrics


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from kilter.data.task import build_task

    # 64 rows at batch 8 is 8 steps an epoch: the 12-step run crosses an epoch boundary
    # after the step-6 checkpoint, so the resumed part must rebuild the next epoch's order.
    task = build_task(seed=2, n_demonstrations=64, n_eval=16)
    folder = tmp_path_factory.mktemp("resume-data")
    for name, rows in (("train.jsonl", task.demonstrations), ("eval.jsonl", task.eval_demonstrations)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "train.jsonl", folder / "eval.jsonl"


def _args(out: Path, data: tuple[Path, Path], *extra: str) -> list[str]:
    train, evals = data
    return ["sft", f"output_dir={out}", f"data.train={train}", f"data.eval={evals}", "batch_size=8",
            "max_steps=12", "save_every=6", "eval_every=6", "log_every=2", "optim.lr=1e-3",
            "optim.weight_decay=0.01", "n_samples=0", "tensorboard=false", *extra]


def test_resume_after_a_kill_matches_the_uninterrupted_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(out, data)) == 0
    straight = _weights(out / "final")
    straight_rows = read_metrics(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-6"]

    # The kill: the run died after writing step-6 and before step-12 and final/.
    shutil.rmtree(out / "checkpoints" / "step-12")
    shutil.rmtree(out / "final")
    capsys.readouterr()
    assert main(_args(out, data, "resume=true")) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-6'} at step 6/12" in capsys.readouterr().out

    resumed = _weights(out / "final")
    assert resumed.keys() == straight.keys()
    for name, tensor in straight.items():
        assert torch.equal(resumed[name], tensor), name

    rows = read_metrics(out)
    train_steps = [r["step"] for r in rows if "loss/sft" in r]
    eval_steps = [r["step"] for r in rows if "eval/loss" in r]
    assert train_steps == [2, 4, 6, 8, 10, 12]  # no duplicates from the first attempt
    assert eval_steps == [6, 12]
    # rows up to the checkpoint are the first attempt's, untouched; later ones were written again
    before = [r for r in straight_rows if r["step"] <= 6]
    assert rows[: len(before)] == before
    for old, new in zip(straight_rows[len(before):], rows[len(before):]):
        assert new["step"] == old["step"] and new["time"] >= old["time"]
        for key in ("loss/sft", "eval/loss", "optim/lr"):
            assert new.get(key) == old.get(key), (new["step"], key)

    # resume=false on a folder that holds checkpoints refuses, rather than mixing two runs
    capsys.readouterr()
    assert main(_args(out, data)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "already holds checkpoints" in last and "resume=true" in last
