"""``kilter demo``: the built-in task end to end, offline, on a laptop CPU.

Stage 1 (this file's first version): SFT of the tiny model on the generated demonstrations,
with samples and gold scores before and after.  Later stages (labels, reward model, PPO,
eval) are appended as they land.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from kilter.config import BaseConfig


class DemoConfig(BaseConfig):
    """The whole built-in loop with small, CPU-friendly settings."""

    output_dir: str = "runs/demo"
    """Parent folder of every stage's run directory."""
    model: str = "builtin:tiny"
    """Starting model (builtin:tiny trains from scratch in about a minute)."""
    sft_epochs: float = Field(3.0, gt=0)
    """Passes over the demonstrations in the SFT stage."""
    seed: int = 0
    """Seed for every stage."""
    resume: bool = False
    """Resume the stages from their checkpoints."""


def run(cfg: DemoConfig) -> int:
    from kilter.trainers.sft import SFTConfig
    from kilter.trainers.sft import run as run_sft

    out = Path(cfg.output_dir)
    sft_cfg = SFTConfig(model=cfg.model, output_dir=str(out / "sft"), epochs=cfg.sft_epochs, seed=cfg.seed,
                        resume=cfg.resume, log_every=25, eval_every=125, save_every=125)
    sft_cfg.optim.lr = 2e-3
    print("== stage 1: supervised fine-tuning on the built-in demonstrations")
    return run_sft(sft_cfg)
