"""Shared fixtures for smoke runs: one tiny SFT model trained once per session.

Only append fixtures here; several test modules share this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory) -> Path:
    """final/ of a short `kilter sft` run of the built-in tiny model on the built-in task."""
    from kilter.cli import main

    out = tmp_path_factory.mktemp("sft-shared") / "run"
    code = main(["sft", f"output_dir={out}", "max_steps=150", "optim.lr=2e-3", "n_samples=0",
                 "eval_every=1000", "save_every=1000", "log_every=25", "tensorboard=false"])
    assert code == 0
    return out / "final"
