"""Fast paths are decided once, visibly: a fallback warns with its reason, strict makes it an error."""

from __future__ import annotations

import json

import pytest
import torch

from kilter import fastpaths
from kilter.errors import KilterError


@pytest.fixture(autouse=True)
def _fresh():
    fastpaths.configure(strict=False)
    yield
    fastpaths.configure(strict=False)


def test_verdicts_warn_once_and_a_path_is_used_only_if_every_model_passed(capsys):
    assert fastpaths.decide("padding_free", True)
    assert not fastpaths.decide("padding_free", False, "packed rows give other logits")
    fastpaths.decide("padding_free", False, "packed rows give other logits")
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "fast path padding_free is off" in err and "other logits" in err
    assert fastpaths.record() == {"perf/padding_free": 0.0}
    fastpaths.decide("own_sampler", True)
    assert fastpaths.record() == {"perf/own_sampler": 1.0, "perf/padding_free": 0.0}


def test_strict_turns_a_fallback_into_one_line_error():
    fastpaths.configure(strict=True)
    fastpaths.decide("shared_prefix", True)
    with pytest.raises(KilterError, match="fast path own_sampler does not fit this model.*strict_fast_paths"):
        fastpaths.decide("own_sampler", False, "Unsupported: BloomForCausalLM")


def test_an_unsupported_model_falls_back_visibly_and_strict_refuses_it(capsys):
    from transformers import BloomConfig, BloomForCausalLM

    from kilter.rollout import fast_decode

    torch.manual_seed(0)  # ALiBi attention: outside the sampler's families
    model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=16, n_layer=1, n_head=2)).eval()
    assert fast_decode.prepare(model, 16) is None
    assert fastpaths.record() == {"perf/own_sampler": 0.0}
    assert "fast path own_sampler is off" in capsys.readouterr().err
    fastpaths.configure(strict=True)
    with pytest.raises(KilterError, match="strict_fast_paths"):
        fast_decode.prepare(model, 16)


def test_a_run_records_its_fast_paths_in_metrics(tmp_path):
    from kilter.cli import main

    out = tmp_path / "sft"
    assert main(["sft", "model=builtin:micro", f"output_dir={out}", "max_steps=2", "batch_size=4", "n_samples=0",
                 "eval_every=100", "tensorboard=false", "log_every=1"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss/sft" in r)
    assert first["perf/padding_free"] == 1.0 and first["perf/completion_logits"] == 1.0
    assert "perf/padding_free" not in rows[-1] or rows[-1] is first  # written once, when decided
