"""A GPT-2 folder, as a user has one, trains through `kilter sft`, `rm` and `dpo` with every fast path on.

The model is ``builtin:gpt2-micro`` saved as a plain folder: a ``GPT2TokenizerFast`` without PAD
token or chat template, a config without ``pad_token_id``, dropout 0.1 (Kilter's loader adds the
PAD, aligns the config and turns dropout off).  Every run sets ``strict_fast_paths=true``, so a
fast path that does not fit GPT-2 would fail the run instead of falling back; the verdicts are
also read back from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest

from kilter.cli import main
from kilter.runs import read_metrics

COMMON = ["tensorboard=false", "threads=1", "strict_fast_paths=true", "eval_every=1000", "log_every=10"]


@pytest.fixture(scope="module")
def gpt2_folder() -> Path:
    from kilter.models.tiny import builtin_model_dir

    folder = builtin_model_dir("gpt2-micro")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config.get("pad_token_id") is None
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tokenizer_config.get("pad_token") is None and not tokenizer_config.get("chat_template")
    return folder


@pytest.fixture(scope="module")
def comparisons(tmp_path_factory) -> Path:
    """Pairs of the built-in demonstrations of one prompt, judged by the gold preference."""
    from kilter.data.labeler import SimulatedLabeler
    from kilter.data.task import build_task

    by_prompt: OrderedDict[str, list[str]] = OrderedDict()
    for d in build_task().demonstrations:
        by_prompt.setdefault(d["prompt"], []).append(d["completion"])
    pairs = SimulatedLabeler(noise=0.0, seed=0).label_comparisons(list(by_prompt), list(by_prompt.values()),
                                                                   pairs="adjacent")
    path = tmp_path_factory.mktemp("gpt2-data") / "comparisons.jsonl"
    path.write_text("".join(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                            for p in pairs[:400]))
    return path


def _perf(rows: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    for row in rows:
        out.update({k: v for k, v in row.items() if k.startswith("perf/") and not k.endswith("_per_s")})
    return out


@pytest.fixture(scope="module")
def sft_run(gpt2_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpt2-sft") / "run"
    assert main(["sft", f"model={gpt2_folder}", f"output_dir={out}", "max_steps=40", "batch_size=8",
                 "optim.lr=3e-3", "n_samples=2", *COMMON]) == 0
    return out


def test_sft_learns_with_packing_completion_logits_and_the_own_sampler(sft_run):
    rows = read_metrics(sft_run)
    assert _perf(rows) == {"perf/completion_logits": 1.0, "perf/padding_free": 1.0, "perf/shared_prefix": 1.0,
                           "perf/own_sampler": 1.0, "perf/fused_activation": 1.0}
    losses = [r["loss/sft"] for r in rows if "loss/sft" in r]
    assert losses[-1] < losses[0] - 1.0  # ~6.0 -> ~4.5 nats in 40 steps


def test_rm_learns_with_packed_and_shared_prefix_scores(gpt2_folder, comparisons, tmp_path):
    out = tmp_path / "rm"
    assert main(["rm", f"model={gpt2_folder}", f"output_dir={out}", f"data.train={comparisons}", "max_steps=30",
                 "batch_size=8", "optim.lr=2e-3", "n_samples=0", *COMMON]) == 0
    rows = read_metrics(out)
    assert _perf(rows) == {"perf/padding_free_scores": 1.0, "perf/shared_prefix_scores": 1.0,
                           "perf/fused_activation": 1.0}
    train = [r for r in rows if "loss/rm" in r]
    assert train[-1]["train/accuracy"] > train[0]["train/accuracy"]
    assert train[-1]["loss/rm"] < math.log(2) - 0.2


def test_dpo_learns_with_shared_prompts_and_samples_with_the_own_sampler(sft_run, comparisons, tmp_path):
    out = tmp_path / "dpo"
    assert main(["dpo", f"model={sft_run / 'final'}", f"output_dir={out}", f"data.train={comparisons}",
                 "max_steps=30", "batch_size=8", "optim.lr=2e-3", "samples.n=2", *COMMON]) == 0
    rows = read_metrics(out)
    assert _perf(rows) == {"perf/completion_logits": 1.0, "perf/padding_free": 1.0, "perf/shared_prefix": 1.0,
                           "perf/own_sampler": 1.0, "perf/fused_activation": 1.0}
    train = [r for r in rows if "loss/dpo" in r]  # a row per 10 steps, each the mean over its window
    assert train[-1]["loss/dpo"] < train[0]["loss/dpo"] - 0.03
    assert train[-1]["loss/dpo"] < math.log(2) - 0.05
    assert train[-1]["rewards/accuracy"] > 0.6


@pytest.mark.parametrize("trainer, extra", [("sft", []), ("dpo", ["samples.n=0"])])
def test_a_max_length_past_gpt2s_learned_positions_is_one_line_exit_2(trainer, extra, gpt2_folder, comparisons,
                                                                      tmp_path, capsys):
    """GPT-2 has 512 learned positions here: a longer data.max_length would crash mid-run in the embedding."""
    data = [f"data.train={comparisons}"] if trainer == "dpo" else []
    code = main([trainer, f"model={gpt2_folder}", f"output_dir={tmp_path / trainer}", "data.max_length=600",
                 "max_steps=1", *data, *extra, *COMMON])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "data.max_length=600 is longer than the 512 positions" in err[-1] and "Traceback" not in "\n".join(err)
