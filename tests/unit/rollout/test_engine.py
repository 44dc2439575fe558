"""The rollout engine interface: HF generate by default, vLLM optional behind an import guard."""

import importlib.util

import pytest
import torch

from kilter.errors import KilterError
from kilter.rollout.engine import HFEngine, RolloutEngine, make_engine
from kilter.rollout.generate import SamplingParams, generate_ids


def test_hf_engine_is_a_rollout_engine_and_samples_like_generate_ids(micro_lm):
    tok, model = micro_lm
    engine = make_engine("hf", model, tok, batch_size=3)
    assert isinstance(engine, HFEngine) and isinstance(engine, RolloutEngine)
    params = SamplingParams(max_new_tokens=5)
    torch.manual_seed(0)
    got = engine.generate([[5, 6], [7, 8, 9]] * 2, params)
    torch.manual_seed(0)
    expected = generate_ids(model, tok, [[5, 6], [7, 8, 9]] * 2, params, batch_size=3)
    assert got.response_ids == expected.response_ids and got.texts == expected.texts
    other = object()
    engine.sync_weights(other)
    assert engine.model is other


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_says_how_to_get_it(micro_lm):
    tok, model = micro_lm
    with pytest.raises(KilterError, match="pip install vllm"):
        make_engine("vllm", model, tok, model_path="unused")


def test_unknown_engine(micro_lm):
    tok, model = micro_lm
    with pytest.raises(KilterError, match="unknown rollout engine"):
        make_engine("tgi", model, tok)  # type: ignore[arg-type]
