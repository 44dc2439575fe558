"""A checkpoint: the model in Hugging Face format, the optimizer/scheduler/RNG state and the step."""

from __future__ import annotations

from pathlib import Path

from kilter.models.saving import save_model
from kilter.runs import RunDir
from kilter.training.state import save_training_state, write_trainer_state


def save_checkpoint(run_dir: RunDir, step: int, model, tokenizer, optimizer, scheduler, keep: int | None,
                    trainer: str) -> None:
    def write(path: Path) -> None:
        save_model(model, tokenizer, path, merge_lora=False)
        save_training_state(path, {"optimizer": optimizer, "scheduler": scheduler})
        write_trainer_state(path, {"step": step, "trainer": trainer})

    run_dir.save_checkpoint(step, write, keep=keep)
