"""Tests of the vLLM engines, run by `make test-vllm` inside the vLLM CPU venv (.venv-vllm).

The main suite does not collect this folder at all (tests/conftest.py ignores it where vLLM is
not installed), so nothing here shows up there as skipped.  Every ``LLM(...)`` start-up costs
seconds (eager) to a minute (compiled) on 2 cores: engines are module-scoped, and only the
colocated engine's module runs vLLM's compiled default.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

if importlib.util.find_spec("vllm") is None:  # asked for by path in a venv without vLLM
    pytest.exit("tests/vllm runs in the vLLM venv: `make test-vllm` (it builds .venv-vllm once)", returncode=4)

# before vLLM is imported: 1 GiB of KV cache is plenty for the tiny model (the default takes a share
# of the machine's memory), and the engine core runs in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory) -> Path:
    """final/ of a short `kilter sft` run of the tiny model: a policy whose outputs are not one repeated token."""
    from kilter.cli import main

    out = tmp_path_factory.mktemp("sft-vllm") / "run"
    code = main(["sft", f"output_dir={out}", "max_steps=150", "optim.lr=2e-3", "n_samples=0", "threads=1",
                 "eval_every=1000", "save_every=1000", "log_every=25", "tensorboard=false"])
    assert code == 0
    return out / "final"


@pytest.fixture(scope="session")
def eval_prompt_ids(sft_dir):
    """Token ids of 12 held-out prompts of the built-in task, as the trainers encode them."""
    from kilter.data.sources import load_records
    from kilter.data.tokenize import encode_prompt
    from kilter.models import load_tokenizer

    tok = load_tokenizer(str(sft_dir))
    rows = load_records("builtin:prompts_eval", "prompt").rows[:12]
    return [encode_prompt(tok, r["prompt"], 128) for r in rows]
