"""Experiment trackers: one `kilter sft` run reports the metrics of metrics.jsonl to each, offline."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kilter.errors import ConfigError
from kilter.runs import RunDir, read_metrics

ROOT = Path(__file__).resolve().parents[2]
ALPACA = ROOT / "tests" / "fixtures" / "layouts" / "alpaca.json"

for module in ("wandb", "mlflow", "trackio", "tensorboard"):
    pytest.importorskip(module, reason=f"{module} is in the dev extra (pip install -e '.[dev]')")


def _expected(run: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl merged per step (evaluation rows share the step of the training row)."""
    merged: dict[int, dict[str, float]] = {}
    for row in read_metrics(run):
        merged.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k not in ("step", "time")})
    return merged


def _wandb_history(path: str) -> dict[int, dict[str, float]]:
    """History rows of an offline run file.

    wandb ships no reader for its .wandb files, which are LevelDB-style logs (a 7-byte file
    header, 32 KiB blocks, records of crc32 / length / type + payload) of protobuf Records.
    """
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, history = 7, b"", {}
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a record header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item}
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history


def _trackio_history(trackio_dir: Path) -> dict[int, dict[str, float]]:
    # trackio reads TRACKIO_DIR once, at import: ask a fresh interpreter.
    code = ("import json, trackio.sqlite_storage as s; "
            "print(json.dumps(s.SQLiteStorage.get_logs('kilter', 'run')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TRACKIO_DIR": str(trackio_dir)})
    history: dict[int, dict[str, float]] = {}
    for row in json.loads(out.stdout.strip().splitlines()[-1]):
        history.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k not in ("step", "timestamp") and not k.startswith("_")})
    return history


def test_every_tracker_receives_the_metrics_of_metrics_jsonl(tmp_path, monkeypatch):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
           "TRACKIO_DIR": str(tmp_path / "trackio")}
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "kilter", "sft", f"data.train={ALPACA}", f"output_dir={run}", "max_steps=2",
         "batch_size=2", "log_every=1", "n_samples=0", "threads=1", "report_to=[tensorboard,wandb,mlflow,trackio]"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    expected = _expected(run)
    assert sorted(expected) == [1, 2] and "loss/sft" in expected[1] and "eval/loss" in expected[2]

    # TensorBoard keeps float32 scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tensorboard = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            tensorboard.setdefault(event.step, {})[tag] = event.value
    assert tensorboard.keys() == expected.keys()
    for step, metrics in expected.items():
        assert tensorboard[step] == pytest.approx(metrics, rel=1e-6)

    assert _wandb_history(glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))[0]) == expected

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    (found,) = client.search_runs([client.get_experiment_by_name("kilter").experiment_id])
    assert found.info.run_name == "run" and found.data.params["data.train"] == str(ALPACA)
    mlflow = {}
    for key in found.data.metrics:
        for metric in client.get_metric_history(found.info.run_id, key):
            mlflow.setdefault(metric.step, {})[key] = metric.value
    assert mlflow == expected

    assert _trackio_history(tmp_path / "trackio") == expected


def test_unknown_or_missing_tracker_is_a_one_line_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="report_to: unknown tracker 'comet'"):
        RunDir(tmp_path / "a", report_to=["comet"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if it were not installed
    with pytest.raises(ConfigError) as info:
        RunDir(tmp_path / "b", report_to=["wandb"])
    assert str(info.value) == ("report_to names wandb, which is not installed: pip install wandb "
                               "(or pip install 'kilter[trackers]')")
