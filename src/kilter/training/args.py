"""The fields every training command shares, declared once (as litgpt's TrainArgs).

Each trainer's config inherits one of these and adds its own fields; a trainer that needs
another default for a shared field (its output folder, PPO's per-iteration cadence) redeclares
just that field.  ``--help`` lists them like any other field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kilter.config import BaseConfig
from kilter.models.lora import LoraSection
from kilter.runs import Tracker
from kilter.training.optim import OptimConfig


class RunArgs(BaseConfig):
    """The run directory, device, precision, seed and cadence of a training command."""

    output_dir: str = "runs/run"
    """Run directory (config.yaml, metrics.jsonl, checkpoints/, final/)."""
    optim: OptimConfig = OptimConfig()
    """Optimizer and learning-rate schedule."""
    lora: LoraSection = LoraSection()
    """LoRA adapters (peft)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """fp32, or bf16 autocast with fp32 master weights."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train (auto: cuda when available)."""
    seed: int = 0
    """Seed for initialisation, data order and sampling."""
    log_every: int = Field(10, gt=0)
    """Log training metrics every N optimizer steps."""
    eval_every: int = Field(100, gt=0)
    """Evaluate every N optimizer steps (and at the end)."""
    save_every: int = Field(200, gt=0)
    """Write a checkpoint every N optimizer steps (and at the end)."""
    keep_checkpoints: int | None = Field(2, gt=0)
    """Keep only the newest N checkpoints (null: keep all)."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir."""
    threads: int | None = Field(None, gt=0)
    """torch CPU threads (null: torch's default)."""
    tensorboard: bool = True
    """Also write TensorBoard event files when tensorboard is installed."""
    report_to: list[Tracker] = []
    """Experiment trackers that also receive every metric: tensorboard, wandb, mlflow, trackio (each set up by its own environment variables: README, "Experiment trackers")."""
    strict_fast_paths: bool = False
    """Fail instead of falling back when a fast path (padding-free rows, shared prefixes, Kilter's sampler) does not fit the model."""


class StepArgs(RunArgs):
    """RunArgs plus the batch, accumulation and length of a step-based (supervised) trainer."""

    batch_size: int = Field(16, gt=0)
    """Examples per micro-batch on each process."""
    grad_accum: int = Field(1, gt=0)
    """Micro-batches per optimizer step."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when max_steps is set)."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
