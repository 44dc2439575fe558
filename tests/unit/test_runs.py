"""The run directory: config.yaml, metrics.jsonl rows, atomic checkpoints, pruning, resume truncation."""

from __future__ import annotations

import json
import math
import stat

import pytest
import torch

from kilter.config import load_config
from kilter.runs import RunDir, atomic_write_text, read_metrics, save_folder_atomically
from kilter.trainers.sft import SFTConfig


def _writer(step: int, payload: str = "weights"):
    def write(path):
        (path / "model.bin").write_text(f"{payload}-{step}")
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))

    return write


def test_config_yaml_is_the_resolved_config(tmp_path):
    run = RunDir(tmp_path / "run", tensorboard=False)
    cfg = load_config(SFTConfig, None, ["optim.lr=1e-3", "batch_size=4"])
    run.write_config(cfg)
    path = tmp_path / "run" / "config.yaml"
    assert load_config(SFTConfig, path) == cfg
    text = path.read_text()
    assert "warmup_ratio: 0.05" in text  # defaults are written out, not only what was set
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_metrics_rows(tmp_path):
    run = RunDir(tmp_path, tensorboard=False)
    run.log(10, {"loss/sft": torch.tensor(2.5), "optim/lr": 1e-3, "eval/perplexity": math.inf})
    run.log(20, {"loss/sft": 1.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert first["step"] == 10 and first["loss/sft"] == 2.5 and first["optim/lr"] == 1e-3
    assert first["eval/perplexity"] is None  # JSON has no infinity; null beats an unreadable file
    assert isinstance(first["time"], float)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20]
    assert read_metrics(tmp_path / "missing") == []


def test_non_writer_writes_nothing(tmp_path):
    run = RunDir(tmp_path / "rank1", writer=False, tensorboard=False)
    run.log(1, {"loss/sft": 1.0})
    run.write_config(SFTConfig())
    assert run.save_checkpoint(1, _writer(1)) is None
    assert run.save_final(_writer(1)) is None
    assert not (tmp_path / "rank1").exists()


def test_truncate_metrics_drops_rows_after_the_checkpoint(tmp_path):
    run = RunDir(tmp_path, tensorboard=False)
    for step in (10, 20, 20, 30, 40):
        run.log(step, {"loss/sft": float(step)})
    run.truncate_metrics(20)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 20]
    run.log(30, {"loss/sft": 3.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 20, 30]


def test_checkpoints_are_listed_in_step_order_and_pruned(tmp_path):
    run = RunDir(tmp_path, tensorboard=False)
    for step in (5, 10, 100, 20):
        run.save_checkpoint(step, _writer(step))
    assert [p.name for p in run.list_checkpoints()] == ["step-5", "step-10", "step-20", "step-100"]
    run.save_checkpoint(200, _writer(200), keep=2)
    assert [p.name for p in run.list_checkpoints()] == ["step-100", "step-200"]
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["step-100", "step-200"]
    assert run.latest_checkpoint().name == "step-200"


def test_folder_without_trainer_state_is_not_a_checkpoint(tmp_path):
    run = RunDir(tmp_path, tensorboard=False)
    (run.checkpoints / "step-7").mkdir()  # e.g. copied by hand, half-finished
    (run.checkpoints / "notes").mkdir()
    assert run.list_checkpoints() == [] and run.latest_checkpoint() is None


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    run = RunDir(tmp_path, tensorboard=False)
    run.save_checkpoint(10, _writer(10))

    def crashing(path):
        _writer(20)(path)
        raise KeyboardInterrupt  # a kill in the middle of the save

    with pytest.raises(KeyboardInterrupt):
        run.save_checkpoint(20, crashing)
    assert [p.name for p in run.list_checkpoints()] == ["step-10"]
    assert (run.checkpoints / "step-10" / "model.bin").read_text() == "weights-10"
    assert [p.name for p in run.checkpoints.iterdir()] == ["step-10"]  # no temp folder left behind


def test_rewriting_a_folder_replaces_it_only_when_complete(tmp_path):
    target = tmp_path / "final"
    save_folder_atomically(target, _writer(1, "old"))

    def crashing(path):
        (path / "model.bin").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        save_folder_atomically(target, crashing)
    assert (target / "model.bin").read_text() == "old-1"
    save_folder_atomically(target, _writer(2, "new"))
    assert sorted(p.name for p in target.iterdir()) == ["model.bin", "trainer_state.json"]
    assert (target / "model.bin").read_text() == "new-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755


def test_atomic_write_text_replaces_whole_file(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old content that is longer")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]
