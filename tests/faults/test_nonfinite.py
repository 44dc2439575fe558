"""nonfinite=skip: a step whose gradient norm is inf/nan is skipped (no update), counted, and capped -- every trainer."""

from __future__ import annotations

import pytest
import torch

from kilter.cli import main
from kilter.runs import read_metrics
from kilter.training import optim


def _poison(monkeypatch, bad_calls) -> dict:
    """Make the gradients of the clip calls numbered in ``bad_calls`` (0-based) NaN before the norm is taken;
    record whether any parameter moved between two calls that follow a poisoned one."""
    seen = {"calls": 0, "moved_after_bad": False}
    snapshot: dict[int, torch.Tensor] = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def poison(params):
        params = list(params)
        call = seen["calls"]
        seen["calls"] += 1
        for p in params:
            if id(p) in snapshot and not torch.equal(snapshot.pop(id(p)), p.detach()):
                seen["moved_after_bad"] = True
        if call in bad_calls:
            for p in params:
                snapshot[id(p)] = p.detach().clone()
                p.grad.fill_(float("nan"))
        return params

    monkeypatch.setattr(optim.torch.nn.utils, "clip_grad_norm_", lambda params, n: real_clip(poison(params), n))
    return seen


TRAINERS = ("sft", "rm", "dpo", "kto", "ppo", "distill")


@pytest.mark.parametrize("name", TRAINERS)
def test_skip_leaves_the_weights_untouched_counts_the_steps_and_finishes(name, faults, tiny_data, tmp_path, monkeypatch,
                                                                         capsys):
    seen = _poison(monkeypatch, bad_calls=range(0, 1000, 2))  # every other update diverges
    out = tmp_path / "run"
    assert main([*faults.args(name, out, tiny_data), "nonfinite=skip"]) == 0, capsys.readouterr().err[-2000:]
    assert seen["calls"] >= 3 and not seen["moved_after_bad"]  # a skipped update changed no weight
    rows = read_metrics(out)
    assert rows[-1]["train/skipped_steps"] == len(range(0, seen["calls"], 2))
    assert all("train/skipped_steps" in r for r in rows)
    assert torch.isfinite(torch.tensor([v for k, v in _final_params(out).items()])).all()


def _final_params(out) -> dict[str, float]:
    from safetensors.torch import load_file

    return {f"{p}:{k}": float(v.float().abs().sum()) for p in (out / "final").rglob("*.safetensors")
            for k, v in load_file(str(p)).items()}


@pytest.mark.parametrize("name", ["sft", "ppo"])
def test_the_default_stops_and_too_many_skips_in_a_row_stop(name, faults, tiny_data, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, bad_calls=range(1, 1000))
    code = main(faults.args(name, tmp_path / "stop", tiny_data))
    err = capsys.readouterr().err
    assert code == 2 and "gradient norm is nan" in err and "nonfinite=skip" in err and "Traceback" not in err
    assert (tmp_path / "stop" / "checkpoints").is_dir() and not (tmp_path / "stop" / "final").exists()
    _poison(monkeypatch, bad_calls=range(1, 1000))
    code = main([*faults.args(name, tmp_path / "cap", tiny_data), "nonfinite=skip", "max_skipped_steps=2"])
    err = capsys.readouterr().err
    assert code == 2 and "3 updates in a row" in err and "max_skipped_steps=2" in err, err[-1500:]
    assert "Traceback" not in err


def test_the_skip_count_survives_a_resume(faults, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _poison(monkeypatch, bad_calls={0})
    args = [*faults.args("sft", out, tiny_data, steps=4), "nonfinite=skip"]
    assert main(args) == 0
    straight = read_metrics(out)
    assert [r["train/skipped_steps"] for r in straight if "loss/sft" in r] == [1, 1, 1, 1]
    import shutil

    for step in (3, 4):
        shutil.rmtree(out / "checkpoints" / f"step-{step}")
    shutil.rmtree(out / "final")
    monkeypatch.undo()
    assert main([*args, "resume=true"]) == 0
    assert [r["train/skipped_steps"] for r in read_metrics(out) if "loss/sft" in r] == [1, 1, 1, 1]
