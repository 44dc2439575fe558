"""A checkpoint: the model in Hugging Face format, the optimizer/scheduler/RNG state and the step."""

from __future__ import annotations

from pathlib import Path

from kilter.models.saving import load_trainable_weights, save_model
from kilter.runs import RunDir
from kilter.training.state import load_training_state, read_trainer_state, save_training_state, write_trainer_state


def save_checkpoint(run_dir: RunDir, step: int, model, tokenizer, optimizer, scheduler, keep: int | None,
                    trainer: str) -> None:
    def write(path: Path) -> None:
        save_model(model, tokenizer, path, merge_lora=False)
        save_training_state(path, {"optimizer": optimizer, "scheduler": scheduler})
        write_trainer_state(path, {"step": step, "trainer": trainer})

    # before the first checkpoint, the room it needs is about the trainable weights and AdamW's two moments
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    run_dir.save_checkpoint(step, write, keep=keep, estimate=3 * trainable)


def resume_from(checkpoint: Path, run_dir: RunDir, model, optimizer, scheduler) -> int:
    """Restore what :func:`save_checkpoint` wrote (weights, optimizer, scheduler, RNG); returns its step.

    Rows the interrupted run logged after that step are dropped from metrics.jsonl, so the
    resumed run's file reads like one uninterrupted run.
    """
    load_trainable_weights(model, checkpoint)
    load_training_state(checkpoint, {"optimizer": optimizer, "scheduler": scheduler})
    step = int(read_trainer_state(checkpoint)["step"])
    run_dir.truncate_metrics(step)
    return step
