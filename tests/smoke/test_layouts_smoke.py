"""Each public layout's fixture file through every command that accepts it (tiny model, 2 steps)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kilter.cli import main
from kilter.runs import read_metrics

LAYOUTS = Path(__file__).resolve().parents[1] / "fixtures" / "layouts"

RUNS = [
    ("sft", "ultrafeedback.jsonl", "loss/sft"),
    ("sft", "alpaca.json", "loss/sft"),
    ("sft", "sharegpt.json", "loss/sft"),
    ("rm", "ultrafeedback.jsonl", "loss/rm"),
    ("rm", "hh.jsonl", "loss/rm"),
    ("rm", "shp.jsonl", "loss/rm"),
    ("dpo", "ultrafeedback.jsonl", "loss/dpo"),
    ("dpo", "hh.jsonl", "loss/dpo"),
    ("dpo", "shp.jsonl", "loss/dpo"),
    ("kto", "ultrafeedback.jsonl", "loss/kto"),
    ("kto", "hh.jsonl", "loss/kto"),
    ("kto", "shp.jsonl", "loss/kto"),
]
SAMPLES = {"sft": "n_samples=0", "rm": "bias_reference=none", "dpo": "samples.n=0", "kto": "samples.n=0"}


@pytest.mark.parametrize("command,name,loss", RUNS, ids=[f"{c}-{n.split('.')[0]}" for c, n, _ in RUNS])
def test_layout_trains_for_two_steps(command, name, loss, tmp_path, caplog):
    out = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="kilter.data")
    code = main([command, "model=builtin:tiny", f"data.train={LAYOUTS / name}", f"output_dir={out}", "max_steps=2",
                 "batch_size=2", "tensorboard=false", "log_every=1", SAMPLES[command]])
    assert code == 0
    steps = [r["step"] for r in read_metrics(out) if loss in r]
    assert steps == [1, 2]
    layout = name.split(".")[0]
    assert f"as {layout} data" in caplog.text
    if command == "kto":
        assert "unpaired into 16 ratings (chosen = desirable, rejected = undesirable)" in caplog.text


def test_sft_on_own_data_evaluates_and_samples_from_it_not_the_builtin_task(tmp_path, capsys):
    code = main(["sft", "model=builtin:tiny", f"data.train={LAYOUTS / 'alpaca.json'}", f"output_dir={tmp_path / 'r'}",
                 "max_steps=2", "batch_size=2", "tensorboard=false", "n_samples=2", "sample_max_new_tokens=4",
                 "data.eval_fraction=0.25"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"kilter sft: eval and samples: 2 records of {LAYOUTS / 'alpaca.json'} held out (data.eval_fraction=0.25)" in out
    assert "Write a short review." in out.split("samples before training:")[1]
    assert "Write a review of the" not in out and "gold" not in out  # the built-in task's prompts and scores
    assert [r for r in read_metrics(tmp_path / "r") if "eval/loss" in r]


def test_sft_without_eval_says_so(tmp_path, capsys):
    code = main(["sft", "model=builtin:tiny", f"data.train={LAYOUTS / 'alpaca.json'}", f"output_dir={tmp_path / 'r'}",
                 "max_steps=1", "batch_size=2", "tensorboard=false", "data.eval_fraction=0"])
    assert code == 0
    out = capsys.readouterr().out
    assert "kilter sft: eval and samples: none (data.eval_fraction=0)" in out and "samples before" not in out
    assert not [r for r in read_metrics(tmp_path / "r") if "eval/loss" in r]


@pytest.mark.parametrize("command", ["sft", "rm", "dpo", "kto"])
def test_data_is_checked_before_the_model_is_loaded(command, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    # a folder that does not exist: reaching the model loader would fail with another message
    code = main([command, f"model={tmp_path / 'no-model'}", f"data.train={bad}", f"output_dir={tmp_path / 'r'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"{bad}:1: " in err and "model folder not found" not in err
