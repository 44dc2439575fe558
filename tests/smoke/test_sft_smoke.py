"""`kilter sft` end to end on the built-in tiny model: it learns, and every data path runs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import pytest
import torch

from kilter.cli import main
from kilter.config import load_config
from kilter.runs import read_metrics
from kilter.trainers.sft import SFTConfig

QUIET = ["tensorboard=false", "n_samples=0", "data.eval=null", "save_every=1000"]


def _sft(*args: str) -> int:
    return main(["sft", *QUIET, *args])


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss/sft"] for r in read_metrics(run) if "loss/sft" in r}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A few hundred demonstrations of the built-in task as JSONL, plain and conversational."""
    from kilter.data.task import build_task

    task = build_task(seed=1, n_demonstrations=300, n_eval=40)
    folder = tmp_path_factory.mktemp("sft-data")

    def write(name: str, rows: list[dict]) -> Path:
        path = folder / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    chat = [{"messages": [{"role": "system", "content": "Write a short review."},
                          {"role": "user", "content": d["prompt"]},
                          {"role": "assistant", "content": d["completion"]}]} for d in task.demonstrations[:64]]
    bad = [dict(d) for d in task.demonstrations[:64]]
    del bad[4]["completion"]  # line 5
    return {
        "train": write("train.jsonl", task.demonstrations),
        "eval": write("eval.jsonl", task.eval_demonstrations),
        "chat": write("chat.jsonl", chat),
        "bad": write("bad.jsonl", bad),
    }


# --------------------------------------------------------------------------- the main run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-smoke") / "run"
    args = ["sft", f"output_dir={out}", "max_steps=60", "optim.lr=2e-3", "log_every=10", "eval_every=30",
            "save_every=1000", "data.max_eval_examples=64", "n_samples=2", "sample_max_new_tokens=12",
            "tensorboard=false"]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(args)
    assert code == 0
    return out, args, stdout.getvalue()


def test_loss_falls_and_metrics_are_namespaced(tiny_run):
    out, _, _ = tiny_run
    rows = read_metrics(out)
    train = [r for r in rows if "loss/sft" in r]
    assert [r["step"] for r in train] == [10, 20, 30, 40, 50, 60]
    assert train[-1]["loss/sft"] < 0.75 * train[0]["loss/sft"], [r["loss/sft"] for r in train]
    for key in ("optim/lr", "optim/grad_norm", "perf/tokens_per_s", "perf/samples_per_s", "progress/epoch"):
        assert all(isinstance(r[key], float) for r in train), key
    assert train[-1]["progress/epoch"] == pytest.approx(60 * 32 / 4000)
    assert train[-1]["optim/lr"] == pytest.approx(2e-3 * 0.1)  # cosine ends at min_lr_ratio
    evals = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]
    for r in evals:
        assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]))


def test_config_yaml_is_resolved(tiny_run):
    out, args, _ = tiny_run
    assert load_config(SFTConfig, out / "config.yaml") == load_config(SFTConfig, None, args[1:])
    text = (out / "config.yaml").read_text()
    assert "lr: 0.002" in text and "grad_accum: 1" in text and "packing: false" in text


def test_samples_are_printed_before_and_after(tiny_run):
    _, _, stdout = tiny_run
    assert "samples before training:" in stdout and "samples after training:" in stdout
    assert re.search(r"^prompt\s+\| response\s+\| gold", stdout, re.M)


def test_final_checkpoint_and_model_folder(tiny_run):
    out, _, _ = tiny_run
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-60"]  # saved at the end
    ckpt = out / "checkpoints" / "step-60"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 60
    assert (ckpt / "training_state.pt").is_file()
    assert (out / "final" / "model.safetensors").is_file()


def test_final_loads_with_plain_transformers_and_generates(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kilter.data.task import build_task
    from kilter.models.loading import resolve_model_path

    out, _, _ = tiny_run
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny"))
    assert tok.pad_token_id != tok.eos_token_id
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    prompt = build_task().eval_prompts[0] + "\n"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 2, text  # the untrained model emits blank lines or fragments


# --------------------------------------------------------------------------- data paths


def test_jsonl_file_with_eval(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['train']}", f"data.eval={files['eval']}", "batch_size=16",
                "max_steps=12", "optim.lr=2e-3", "log_every=1", "eval_every=12") == 0
    assert "300 examples, 12 steps, global batch 16" in capsys.readouterr().out
    losses = _losses(out)
    assert list(losses) == list(range(1, 13))
    assert losses[12] < losses[1]
    assert [r["step"] for r in read_metrics(out) if "eval/loss" in r] == [12]


def test_conversational_records_use_the_chat_template(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['chat']}", f"data.eval={files['chat']}",
                "data.max_eval_examples=8", "n_samples=2", "sample_max_new_tokens=4", "batch_size=16",
                "max_steps=2", "log_every=1") == 0
    stdout = capsys.readouterr().out
    assert "64 examples" in stdout
    assert "samples after training:" in stdout
    assert len(_losses(out)) == 2 and all(math.isfinite(v) for v in _losses(out).values())


def test_skip_invalid_counts_the_bad_row(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['bad']}", "data.skip_invalid=true", "batch_size=16",
                "max_steps=1") == 0
    captured = capsys.readouterr()
    assert "skipped 1 invalid rows" in captured.err
    assert "63 examples" in captured.out


def test_bad_row_without_skip_invalid_names_file_line_field(files, tmp_path, capsys):
    assert _sft(f"output_dir={tmp_path / 'run'}", f"data.train={files['bad']}", "max_steps=1") == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (transformers' own loading bars may come before it)
    assert "Traceback" not in err and err.count("error") == 1
    assert last == f"kilter sft: error: {files['bad']}:5: field 'completion': missing"


def test_missing_data_file(tmp_path, capsys):
    assert _sft(f"output_dir={tmp_path / 'run'}", f"data.train={tmp_path / 'nope.jsonl'}") == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_packing(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['train']}", "data.packing=true", "data.max_length=128",
                "batch_size=4", "max_steps=3", "log_every=1") == 0
    n_rows = int(re.search(r"(\d+) examples", capsys.readouterr().out).group(1))
    assert 300 * 20 // 128 <= n_rows < 300 // 2  # demonstrations are ~20-40 tokens: several per row
    assert len(_losses(out)) == 3 and all(math.isfinite(v) for v in _losses(out).values())


def test_grad_accum_matches_a_bigger_batch(files, tmp_path):
    common = [f"data.train={files['train']}", "max_steps=4", "log_every=1", "optim.lr=2e-3"]
    assert _sft(f"output_dir={tmp_path / 'big'}", "batch_size=32", *common) == 0
    assert _sft(f"output_dir={tmp_path / 'accum'}", "batch_size=16", "grad_accum=2", *common) == 0
    big, accum = _losses(tmp_path / "big"), _losses(tmp_path / "accum")
    assert list(big) == [1, 2, 3, 4]
    for step in big:
        assert accum[step] == pytest.approx(big[step], abs=1e-5), step
    assert big[4] != pytest.approx(big[1], abs=1e-3)  # the weights did move between steps


def test_bf16_learns(files, tmp_path):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['train']}", "precision=bf16", "batch_size=16",
                "max_steps=20", "optim.lr=3e-3", "log_every=5") == 0
    losses = _losses(out)
    assert losses[20] < losses[5] - 0.5, losses
    from safetensors.torch import load_file

    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights


def test_gradient_checkpointing_gives_the_same_losses(files, tmp_path):
    common = [f"data.train={files['train']}", "batch_size=8", "max_steps=3", "log_every=1"]
    assert _sft(f"output_dir={tmp_path / 'plain'}", *common) == 0
    assert _sft(f"output_dir={tmp_path / 'ckpt'}", "gradient_checkpointing=true", *common) == 0
    plain, ckpt = _losses(tmp_path / "plain"), _losses(tmp_path / "ckpt")
    assert list(plain) == [1, 2, 3]
    for step in plain:
        assert ckpt[step] == pytest.approx(plain[step], rel=1e-6)
