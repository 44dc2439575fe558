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
