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
from kilter.config import describe_fields, load_config
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


# --------------------------------------------------------------------------- the shared run
# `sft_model_dir` (tests/smoke/conftest.py) is the built-in tiny model after a short
# `kilter sft` on the built-in task; several smoke tests start from it, so it is trained once.


@pytest.fixture(scope="module")
def shared_run(sft_model_dir) -> Path:
    return Path(sft_model_dir).parent


def test_loss_falls_and_metrics_are_namespaced(shared_run):
    cfg = load_config(SFTConfig, shared_run / "config.yaml")
    rows = read_metrics(shared_run)
    train = [r for r in rows if "loss/sft" in r]
    assert [r["step"] for r in train] == list(range(cfg.log_every, cfg.max_steps + 1, cfg.log_every))
    assert train[-1]["loss/sft"] < 0.75 * train[0]["loss/sft"], [r["loss/sft"] for r in train]
    for key in ("optim/lr", "optim/grad_norm", "perf/tokens_per_s", "perf/samples_per_s", "progress/epoch"):
        assert all(isinstance(r[key], float) for r in train), key
    assert train[-1]["progress/epoch"] == pytest.approx(cfg.max_steps * cfg.batch_size / 4000)
    assert train[-1]["optim/lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)  # cosine ends there
    evals = [r for r in rows if "eval/loss" in r]
    assert evals and evals[-1]["step"] == cfg.max_steps  # evaluated at the end at least
    for r in evals:
        assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]))
    assert evals[-1]["eval/loss"] < train[0]["loss/sft"]


def test_config_yaml_is_resolved(shared_run):
    cfg = load_config(SFTConfig, shared_run / "config.yaml")
    assert Path(cfg.output_dir) == shared_run
    text = (shared_run / "config.yaml").read_text()
    # every option is written out, defaults included, so the file alone reproduces the run
    for key, *_ in describe_fields(SFTConfig):
        assert re.search(rf"^\s*{re.escape(key.split('.')[-1])}:", text, re.M), key


def test_final_checkpoint_and_model_folder(shared_run):
    steps = load_config(SFTConfig, shared_run / "config.yaml").max_steps
    ckpts = [p.name for p in (shared_run / "checkpoints").iterdir()]
    assert f"step-{steps}" in ckpts  # always saved at the end
    ckpt = shared_run / "checkpoints" / f"step-{steps}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == steps
    assert (ckpt / "training_state.pt").is_file()
    assert (shared_run / "final" / "model.safetensors").is_file()


def test_final_loads_with_plain_transformers_and_generates(shared_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kilter.data.task import build_task
    from kilter.models.loading import resolve_model_path

    tok = AutoTokenizer.from_pretrained(shared_run / "final")
    model = AutoModelForCausalLM.from_pretrained(shared_run / "final")
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny"))
    assert tok.pad_token_id != tok.eos_token_id
    assert not torch.equal(model.model.embed_tokens.weight, base.model.embed_tokens.weight)
    prompt = build_task().eval_prompts[0] + "\n"
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert len(text.split()) >= 2, text  # the untrained model emits blank lines or fragments


# --------------------------------------------------------------------------- data paths and options
# One fp32 reference run on a JSONL file (constant LR, no warmup, so a shorter run's first
# steps are the same steps); the options below are compared against its losses.
REFERENCE = ["batch_size=16", "optim.lr=2e-3", "optim.schedule=constant", "optim.warmup_ratio=0", "log_every=1"]


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("sft-reference") / "run"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = _sft(f"output_dir={out}", f"data.train={files['train']}", f"data.eval={files['eval']}",
                    "max_steps=12", "eval_every=12", *REFERENCE)
    assert code == 0
    return out, stdout.getvalue()


def test_jsonl_file_with_eval(reference):
    out, stdout = reference
    assert "300 examples, 12 steps, global batch 16" in stdout
    losses = _losses(out)
    assert list(losses) == list(range(1, 13))
    assert losses[12] < losses[1] - 1.0, losses
    assert [r["step"] for r in read_metrics(out) if "eval/loss" in r] == [12]


def test_grad_accum_matches_a_bigger_batch(files, reference, tmp_path):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['train']}", "max_steps=3", *REFERENCE,
                "batch_size=8", "grad_accum=2") == 0
    accum, big = _losses(out), _losses(reference[0])
    assert list(accum) == [1, 2, 3]
    for step in accum:
        assert accum[step] == pytest.approx(big[step], abs=1e-5), step
    assert big[3] != pytest.approx(big[1], abs=1e-2)  # the weights did move between steps


def test_gradient_checkpointing_gives_the_same_losses(files, reference, tmp_path):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['train']}", "max_steps=3", *REFERENCE,
                "gradient_checkpointing=true") == 0
    ckpt, plain = _losses(out), _losses(reference[0])
    assert list(ckpt) == [1, 2, 3]
    for step in ckpt:
        assert ckpt[step] == pytest.approx(plain[step], rel=1e-5), step


def test_bf16_learns_like_fp32(files, reference, tmp_path, capsys):
    from kilter.models.precision import cpu_bf16_support

    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['train']}", "max_steps=4", *REFERENCE,
                "precision=bf16") == 0
    bf16, fp32 = _losses(out), _losses(reference[0])
    assert bf16[4] < bf16[1] - 0.5, bf16
    # bf16 matmuls really happen where the CPU has bf16 instructions; elsewhere the run is fp32 and says so
    native = cpu_bf16_support() == "native"
    assert ("precision=bf16 runs in fp32 on this CPU" in capsys.readouterr().err) == (not native)
    for step in bf16:
        assert bf16[step] == pytest.approx(fp32[step], rel=0.01), step  # autocast, not a different run
        if step > 1:
            assert (bf16[step] != fp32[step]) if native else (bf16[step] == fp32[step]), step
    from safetensors.torch import load_file

    weights = load_file(str(out / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights


def test_conversational_records_use_the_chat_template(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['chat']}", f"data.eval={files['chat']}",
                "data.max_eval_examples=8", "n_samples=2", "sample_max_new_tokens=4", "batch_size=16",
                "max_steps=2", "log_every=1") == 0
    stdout = capsys.readouterr().out
    assert "64 examples" in stdout
    assert "samples before training:" in stdout and "samples after training:" in stdout
    assert re.search(r"^prompt\s+\| response\s*$", stdout, re.M)  # no gold column outside the built-in task
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
    assert "nope.jsonl" in capsys.readouterr().err.strip().splitlines()[-1]


def test_packing(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert _sft(f"output_dir={out}", f"data.train={files['train']}", "data.packing=true", "data.max_length=128",
                "batch_size=4", "max_steps=3", "log_every=1") == 0
    n_rows = int(re.search(r"(\d+) examples", capsys.readouterr().out).group(1))
    assert 300 * 20 // 128 <= n_rows < 300 // 2  # demonstrations are ~20-40 tokens: several per row
    assert len(_losses(out)) == 3 and all(math.isfinite(v) for v in _losses(out).values())
