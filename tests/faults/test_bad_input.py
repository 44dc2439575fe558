"""Bad configs, devices and data files: one line naming what is wrong, exit 2, no traceback (issue 19, items 9-10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kilter.cli import main

SFT = ["model=builtin:micro", "max_steps=1", "batch_size=2", "n_samples=0", "tensorboard=false", "threads=1",
       "data.eval=null"]
DEMOS = [{"prompt": f"Describe lamp {i}.", "completion": f"Lamp {i} is bright."} for i in range(6)]



def _jsonl(path: Path, rows: list, prefix: str = "") -> Path:
    path.write_text(prefix + "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _sft(tmp_path: Path, *args: str) -> int:
    return main(["sft", f"output_dir={tmp_path / 'run'}", *SFT, *args])


# ------------------------------------------------------------------ configs and devices (item 9)


def test_adam_betas_outside_0_1(tmp_path, capsys, one_line_error):
    one_line_error(_sft(tmp_path, "optim.betas=[1.5,2.0]"), "optim.betas", "less than 1", "1.5")
    one_line_error(_sft(tmp_path, "optim.betas=[0.9,-0.1]"), "optim.betas", "-0.1")


def test_a_config_file_that_is_not_utf8(tmp_path, capsys, one_line_error):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("seed: 1\nnote: caf\xe9\n".encode("latin-1"))
    one_line_error(main(["sft", "--config", str(path), *SFT]), str(path), "not UTF-8", "0xe9")


def test_duplicate_yaml_keys(tmp_path, capsys, one_line_error):
    path = tmp_path / "twice.yaml"
    path.write_text("seed: 1\noptim:\n  lr: 1.0e-3\n  lr: 1.0e-2\n")
    one_line_error(main(["sft", "--config", str(path), *SFT]), str(path), "line 4", "'lr' is given twice")
    merged = tmp_path / "merged.yaml"  # keys merged with << may be overridden: that is no duplicate
    merged.write_text("base: &b {lr: 1.0e-3, weight_decay: 0.1}\noptim:\n  <<: *b\n  lr: 2.0e-3\n")
    from kilter.config import load_yaml

    assert load_yaml(merged.read_text())["optim"] == {"lr": 2.0e-3, "weight_decay": 0.1}


def test_lora_target_modules_the_model_does_not_have(tmp_path, capsys, one_line_error):
    code = _sft(tmp_path, "lora.enabled=true", "lora.target_modules=[no_such_module]")
    one_line_error(code, "lora.target_modules", "no_such_module", "q_proj", "all-linear")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch; this one has CUDA")
@pytest.mark.parametrize("command", ["sft", "label", "bon", "eval", "score"])
def test_cuda_on_a_cpu_only_torch(command, tmp_path, capsys, one_line_error):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "completion": "c"}])
    extra = {"sft": [f"output_dir={tmp_path / 'out'}", *SFT], "label": [f"output_dir={tmp_path / 'out'}"],
             "bon": [f"output_dir={tmp_path / 'out'}", "reward_fn=kilter.data.task:gold_scores"],
             "eval": [f"output_dir={tmp_path / 'out'}", "models=[builtin:micro]"],
             "score": [f"input={pairs}"]}[command]
    code = main([command, *([] if command == "eval" else ["model=builtin:micro"]), *extra, "device=cuda"])
    one_line_error(code, "device=cuda", "device=cpu")


@pytest.mark.parametrize("device, needle", [("foo", "'foo' is not a device"), ("mps", "no mps device"),
                                            ("cuda:99", "cuda:99")])
def test_a_free_form_device_is_checked(device, needle, tmp_path, capsys, one_line_error):
    code = main(["label", "model=builtin:micro", f"output_dir={tmp_path / 'labels'}", f"device={device}"])
    one_line_error(code, needle)
    assert not (tmp_path / "labels").exists()


# ------------------------------------------------------------------ damaged data files (item 9)


def test_a_parquet_file_with_a_damaged_data_page(tmp_path, capsys, one_line_error):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "demos.parquet"
    rows = [{"prompt": f"Describe lamp {i}.", "completion": f"Lamp {i} is bright. " * (i % 7 + 1)} for i in range(3000)]
    pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy", row_group_size=1000)
    pq.read_table(path)  # sound before the damage
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = b"\xff" * 2000  # inside the data pages; the footer (schema, offsets) intact
    path.write_bytes(bytes(data))
    pq.ParquetFile(path)  # still opens: only reading the batches finds the damage
    one_line_error(_sft(tmp_path, f"data.train={path}"), str(path), "cannot read as Parquet", "damaged")


@pytest.fixture
def saved_dataset(tmp_path) -> Path:
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(DEMOS).save_to_disk(str(folder))
    return folder


def test_a_saved_dataset_with_a_broken_state_json(saved_dataset, tmp_path, capsys, one_line_error):
    (saved_dataset / "state.json").write_text('{"_data_files": [')
    one_line_error(_sft(tmp_path, f"data.train={saved_dataset}"), str(saved_dataset),
                    "cannot load this save_to_disk folder", "save the dataset again")


def test_a_saved_dataset_without_its_arrow_file(saved_dataset, tmp_path, capsys, one_line_error):
    for arrow in saved_dataset.glob("*.arrow"):
        arrow.unlink()
    one_line_error(_sft(tmp_path, f"data.train={saved_dataset}"), str(saved_dataset),
                    "cannot load this save_to_disk folder")


# ------------------------------------------------------------------ rows (item 10)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_bom_is_accepted(suffix, tmp_path, capsys):
    path = tmp_path / f"demos{suffix}"
    if suffix == ".jsonl":
        _jsonl(path, DEMOS, prefix="\ufeff")
    else:
        path.write_text("\ufeff" + json.dumps(DEMOS), encoding="utf-8")
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert _sft(tmp_path, f"data.train={path}") == 0, capsys.readouterr().err[-1500:]


def test_an_unknown_message_role_names_the_row_and_the_roles_accepted(tmp_path, capsys, one_line_error):
    rows = [*DEMOS, {"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    path = _jsonl(tmp_path / "chat.jsonl", rows)
    one_line_error(_sft(tmp_path, f"data.train={path}"), f"{path}:7", "unknown role 'human'",
                    "system, developer, user, assistant, tool")


@pytest.mark.parametrize("row", [{"prompt": "Describe it.", "completion": "  \n\t"},
                                 {"prompt": "   ", "completion": "A lamp."},
                                 {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]}])
def test_whitespace_only_text_is_refused_like_empty(row, tmp_path, capsys, one_line_error):
    path = _jsonl(tmp_path / "demos.jsonl", [*DEMOS, row])
    one_line_error(_sft(tmp_path, f"data.train={path}"), f"{path}:7")


def test_extra_csv_cells_are_an_error_not_dropped(tmp_path, capsys, one_line_error):
    path = tmp_path / "demos.csv"
    lines = ["prompt,completion"] + [f"{r['prompt']},{r['completion']}" for r in DEMOS] + ["Describe it.,A lamp, bright"]
    path.write_text("\n".join(lines) + "\n")
    one_line_error(_sft(tmp_path, f"data.train={path}"), f"{path}:8", "3 cells", "2 columns", "quote")
    ok = tmp_path / "trailing.csv"  # an empty trailing cell (what spreadsheets write) holds nothing to lose
    ok.write_text("\n".join(["prompt,completion"] + [f"{r['prompt']},{r['completion']}," for r in DEMOS]) + "\n")
    assert _sft(tmp_path / "ok", f"data.train={ok}") == 0


@pytest.mark.parametrize("command", ["sft", "ppo"])
def test_the_skip_invalid_notice_is_printed_once(command, tmp_path, capsys):
    # in a real process: under pytest, the logging plugin would swallow a second notice sent through logging
    import os
    import subprocess
    import sys

    if command == "sft":
        path = _jsonl(tmp_path / "d.jsonl", [*DEMOS, {"prompt": "no completion"}])
        args = ["sft", *SFT, f"data.train={path}"]
    else:
        path = _jsonl(tmp_path / "p.jsonl", [{"prompt": r["prompt"]} for r in DEMOS] + [{"text": "no prompt"}])
        args = ["ppo", "model=builtin:micro", "iterations=1", "reward.function=builtin:gold", "rollout.batch_size=2",
                "rollout.max_new_tokens=4", "update.num_minibatches=1", "tensorboard=false", "threads=1", "n_samples=0",
                f"data.prompts={path}"]
    args += [f"output_dir={tmp_path / 'run'}", "data.skip_invalid=true"]
    if command == "ppo":  # it prints its notice itself: in-process is enough
        assert main(args) == 0
        captured = capsys.readouterr()
        assert (captured.err + captured.out).count("skipped 1 invalid row") == 1, captured.err[-1500:]
        return
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "kilter", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-1500:]
    assert (done.stderr + done.stdout).count("skipped 1 invalid row") == 1, done.stderr[-1500:]
