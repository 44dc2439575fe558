"""Runs that survive bad input and damage: one line and exit 2, nothing saved is lost (issue: runs that survive anything)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from kilter.cli import main
from kilter.runs import RunDir, read_metrics

SFT = ["model=builtin:micro", "max_steps=2", "batch_size=4", "n_samples=0", "eval_every=100", "save_every=1",
       "tensorboard=false", "threads=1", "log_every=1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)



@pytest.fixture(scope="module")
def sft_final(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sft") / "run"
    assert main(["sft", f"output_dir={out}", *SFT]) == 0
    return out / "final"


def test_a_language_model_folder_is_refused_as_a_reward_model(sft_final, tmp_path, capsys, one_line_error):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "Review the lamp.", "chosen": "Good lamp.", "rejected": "Bad."}) + "\n")
    one_line_error(main(["score", f"model={sft_final}", f"input={data}"]), "no reward head", "kilter rm")
    code = main(["ppo", "model=builtin:micro", f"reward.model={sft_final}", f"output_dir={tmp_path / 'ppo'}",
                 "iterations=1", "tensorboard=false"])
    one_line_error(code, "no reward head")
    assert not (tmp_path / "ppo").exists()  # refused before anything was written


@pytest.mark.parametrize("override", ["optim.lr=.inf", "optim.lr=nan", "optim.weight_decay=inf"])
def test_non_finite_numbers_are_refused_in_every_float_field(tmp_path, capsys, override, one_line_error):
    one_line_error(main(["sft", f"output_dir={tmp_path / 'run'}", override, *SFT]), override.split("=")[0])


def test_a_non_finite_gradient_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, one_line_error):
    from kilter.training import optim

    out = tmp_path / "run"
    assert main(["sft", f"output_dir={out}", *SFT]) == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    real = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(optim.torch.nn.utils, "clip_grad_norm_", lambda params, n: real(params, n) * float("nan"))
    code = main(["sft", f"output_dir={out}", "resume=true", *[a for a in SFT if not a.startswith("max_steps")],
                 "max_steps=4"])
    one_line_error(code, "gradient norm is nan", "last checkpoint is intact")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_a_finished_run_is_not_overwritten_silently(sft_final, capsys, one_line_error):
    out = sft_final.parent
    for name in ("checkpoints",):
        for child in (out / name).iterdir():
            import shutil

            shutil.rmtree(child)
    rows = len(read_metrics(out))
    one_line_error(main(["sft", f"output_dir={out}", *SFT]), "previous run", "overwrite=true")
    assert len(read_metrics(out)) == rows
    assert main(["sft", f"output_dir={out}", "overwrite=true", *SFT]) == 0
    assert [r["step"] for r in read_metrics(out) if "loss/sft" in r] == [1, 2]  # a new run, not appended


def test_output_dir_that_is_a_file_is_one_line(tmp_path, capsys, one_line_error):
    path = tmp_path / "a-file"
    path.write_text("x")
    one_line_error(main(["sft", f"output_dir={path}", *SFT]), "is a file")


def test_disk_full_while_writing_a_checkpoint_is_one_line(tmp_path, capsys, monkeypatch, one_line_error):
    def full(self, step, write, keep=None, estimate=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.checkpoints))

    monkeypatch.setattr(RunDir, "save_checkpoint", full)
    code = main(["sft", f"output_dir={tmp_path / 'run'}", *SFT])
    one_line_error(code, "No space left on device", "checkpoints")


def test_a_partial_last_metrics_line_is_tolerated_and_temporaries_are_cleaned(tmp_path):
    out = tmp_path / "run"
    assert main(["sft", f"output_dir={out}", *SFT]) == 0
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 3, "loss/sf')  # a kill in the middle of a write
    (out / "checkpoints" / ".step-9-tmpabc").mkdir()
    (out / ".final-tmpxyz").mkdir()
    assert read_metrics(out)[-1]["step"] == 2
    assert main(["sft", f"output_dir={out}", "resume=true", *[a for a in SFT if not a.startswith("max_steps")],
                 "max_steps=3"]) == 0
    assert not (out / "checkpoints" / ".step-9-tmpabc").exists() and not (out / ".final-tmpxyz").exists()
    steps = [r["step"] for r in read_metrics(out) if "loss/sft" in r]
    assert steps == [1, 2, 3]


def _damage(ckpt: Path, kind: str) -> None:
    if kind == "truncated-weights":
        data = (ckpt / "model.safetensors").read_bytes()
        (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "empty-weights":
        (ckpt / "model.safetensors").write_bytes(b"")
    elif kind == "truncated-state":
        data = (ckpt / "training_state.pt").read_bytes()
        (ckpt / "training_state.pt").write_bytes(data[:100])
    elif kind == "broken-trainer-state":
        (ckpt / "trainer_state.json").write_text('{"step": ')
    else:
        raise ValueError(kind)


@pytest.fixture(scope="module")
def straight_four(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["sft", f"output_dir={out}", *[a for a in SFT if not a.startswith("max_steps")], "max_steps=4"]) == 0
    return out


@pytest.mark.parametrize("kind", ["truncated-weights", "empty-weights", "truncated-state", "broken-trainer-state"])
def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_as_an_uninterrupted_one(tmp_path, capsys, kind,
                                                                                         straight_four):
    import shutil

    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = [a for a in SFT if not a.startswith("max_steps")]
    assert main(["sft", f"output_dir={out}", *args, "max_steps=4", "keep_checkpoints=null"]) == 0
    assert (out / "checkpoints" / "step-3" / "manifest.json").is_file()
    # as if killed after writing step 3: no step 4, no final/, and step 3 damaged
    shutil.rmtree(out / "checkpoints" / "step-4")
    shutil.rmtree(out / "final")
    _damage(out / "checkpoints" / "step-3", kind)
    capsys.readouterr()
    assert main(["sft", f"output_dir={out}", *args, "max_steps=4", "resume=true", "keep_checkpoints=null"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint" in err and "step-3 is damaged" in err and "Traceback" not in err
    got, want = load_file(str(out / "final" / "model.safetensors")), load_file(str(straight_four / "final" / "model.safetensors"))
    assert all(torch.equal(got[k], want[k]) for k in want)  # resumed from step 2: bit-identical to the straight run


def test_resume_with_a_changed_config_is_refused_unless_asked_and_every_change_is_recorded(tmp_path, capsys, one_line_error):
    out = tmp_path / "run"
    assert main(["sft", f"output_dir={out}", *SFT]) == 0
    base = [a for a in SFT if not a.startswith("max_steps")]
    code = main(["sft", f"output_dir={out}", *base, "max_steps=3", "resume=true", "optim.lr=1e-2"])
    one_line_error(code, "optim.lr changed", "resume_with_changes=true")
    assert not (out / "config_changes.jsonl").exists()
    assert main(["sft", f"output_dir={out}", *base, "max_steps=3", "resume=true", "optim.lr=1e-2",
                 "resume_with_changes=true"]) == 0
    changes = [json.loads(line)["changes"] for line in (out / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["optim.lr"]["to"] == 0.01 and changes[-1]["max_steps"] == {"from": 2, "to": 3}


def _tensorboard_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_tensorboard_is_truncated_to_the_resumed_step_and_a_refused_run_writes_none(tmp_path, capsys, one_line_error):
    import shutil

    out = tmp_path / "run"
    args = [a for a in SFT if a not in ("tensorboard=false",) and not a.startswith("max_steps")]
    assert main(["sft", f"output_dir={out}", *args, "max_steps=4", "keep_checkpoints=null"]) == 0
    assert _tensorboard_steps(out, "loss/sft") == [1, 2, 3, 4]
    events = sorted((out / "tensorboard").iterdir())
    # killed after step 2 was saved: the resumed run logs steps 3 and 4 again, TensorBoard shows them once
    for step in (3, 4):
        shutil.rmtree(out / "checkpoints" / f"step-{step}")
    shutil.rmtree(out / "final")
    assert main(["sft", f"output_dir={out}", *args, "max_steps=4", "resume=true", "keep_checkpoints=null"]) == 0
    assert len(list((out / "tensorboard").iterdir())) == len(events) + 1
    assert _tensorboard_steps(out, "loss/sft") == [1, 2, 3, 4]
    # a start refused after the run directory was opened (overwrite=true, but the batch is too large) adds no
    # event file, nor anything else, and removes nothing (the old metrics stay until the new run logs a row)
    shutil.rmtree(out / "checkpoints")
    before = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code = main(["sft", f"output_dir={out}", *args, "max_steps=4", "overwrite=true", "batch_size=100000"])
    one_line_error(code, "fewer than one global batch")
    assert {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_too_little_free_space_for_a_checkpoint_is_one_line_before_it_starts(tmp_path, capsys, monkeypatch, one_line_error):
    import collections
    import shutil

    import kilter.runs

    out = tmp_path / "run"
    real = shutil.disk_usage
    Usage = collections.namedtuple("Usage", "total used free")

    def nearly_full(path):
        # room for the first checkpoint only
        first = out / "checkpoints" / "step-1"
        free = 10**9 if not first.exists() else sum(p.stat().st_size for p in first.rglob("*") if p.is_file()) // 2
        return Usage(real(path).total, 0, free)

    monkeypatch.setattr(kilter.runs.shutil, "disk_usage", nearly_full)
    code = main(["sft", f"output_dir={out}", *SFT])
    line = one_line_error(code, "not enough free space", str(out / "checkpoints"), "checkpoint step-2",
                           "MB", "step-1) is intact")
    assert "needs about" in line
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # nothing half-started
    assert kilter.runs.verify_manifest(out / "checkpoints" / "step-1") is None
    # before the first checkpoint the need is estimated from the parameters (weights + AdamW moments)
    monkeypatch.setattr(kilter.runs.shutil, "disk_usage", lambda path: Usage(real(path).total, 0, 1000))
    code = main(["sft", f"output_dir={tmp_path / 'fresh'}", *SFT])
    one_line_error(code, "not enough free space", "checkpoint step-1", "nothing was written")
    assert list((tmp_path / "fresh" / "checkpoints").iterdir()) == []
