"""The fields every training command shares, declared once (as litgpt's TrainArgs).

Each trainer's config inherits one of these and adds its own fields; a trainer that needs
another default for a shared field (its output folder, PPO's per-iteration cadence) redeclares
just that field.  ``--help`` lists them like any other field.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from kilter.config import BaseConfig
from kilter.data.formats import DataFormat
from kilter.models.lora import LoraSection
from kilter.runs import Tracker
from kilter.training.optim import OptimConfig
from kilter.training.samples import SampleSection


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
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: ddp (a full copy of weights, gradients and optimizer state per process) or fsdp (FSDP2: all three sharded across the processes; docs/distributed.md)."""
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
    resume_with_changes: bool = False
    """Let resume=true continue although keys that change what the run computes (model, data, seed, batch, optimizer) differ from config.yaml; each change is recorded in config_changes.jsonl."""
    overwrite: bool = False
    """Start afresh in an output_dir that holds a finished run (final/, metrics.jsonl); without it such a folder is refused."""
    threads: int | None = Field(None, gt=0)
    """torch CPU threads (null: torch's default)."""
    tensorboard: bool = True
    """Also write TensorBoard event files when tensorboard is installed."""
    report_to: list[Tracker] = []
    """Experiment trackers that also receive every metric: tensorboard, wandb, mlflow, trackio (each set up by its own environment variables: README, "Experiment trackers")."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A step whose loss or gradient norm is inf/nan: stop the run (the last checkpoint intact), or skip its update (counted as train/skipped_steps)."""
    max_skipped_steps: int = Field(10, gt=0)
    """With nonfinite=skip, stop the run after this many skipped updates in a row."""
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


class PreferenceArgs(StepArgs):
    """StepArgs plus the policy, its frozen reference and the samples of DPO-style trainers (DPO, KTO)."""

    help_overrides: ClassVar[dict[str, str]] = {
        "eval_every": "Evaluate every N optimizer steps (and before and after training).",
        "log_every": "Log training metrics (averaged since the last log) every N optimizer steps.",
        "lora": "LoRA adapters (peft); the reference is then the base model with the adapter disabled.",
    }
    """--help for the shared fields, in these trainers' terms."""

    model: str = "runs/sft/final"
    """Policy to start from (usually the SFT model): a folder, a preset (smollm2-135m), builtin:tiny, or a hub id when online."""
    ref_model: str | None = None
    """Reference model (null: the starting model; with LoRA, the base with the adapter disabled)."""
    beta: float = Field(0.1, gt=0)
    """Strength of the KL constraint: implicit reward = beta * log(pi / pi_ref)."""
    reference: Literal["precompute", "online"] = "precompute"
    """precompute: reference log-probs in one pass before training, cached in the run directory; online: every step."""
    samples: SampleSection = SampleSection()
    """Samples before and after training."""


class DataArgs(BaseConfig):
    """The fields every trainer's data section shares: layout, split, bad rows, length, batching by length."""

    format: DataFormat = "auto"
    """Layout of the files: auto (judged from the first row), kilter, ultrafeedback, hh, shp (docs/data.md)."""
    split: str | None = None
    """Split of a saved DatasetDict given as data.train (default train); data.eval=DIR:split picks its own."""
    skip_invalid: bool = False
    """Skip malformed rows (counted and reported) instead of stopping at the first."""
    max_length: int = Field(256, gt=1)
    """Maximum tokens of prompt + response (the prompt is cut first, from the left)."""
    group_by_length: bool = True
    """Batch items of similar length together to cut padding."""
