"""Resolve a data spec: a file/folder path, or ``builtin:<name>`` for the built-in task.

Built-in names: ``sft`` / ``sft_eval`` (demonstrations), ``prompts`` / ``prompts_eval``
(prompts), ``corpus`` (text).  The built-in data is generated in memory, deterministically,
so tests and the demo never touch the network or the disk for data.
"""

from __future__ import annotations

from kilter.data.readers import Records, read_records
from kilter.errors import KilterError

BUILTIN = {
    "sft": ("demonstration", lambda t: t.demonstrations),
    "sft_eval": ("demonstration", lambda t: t.eval_demonstrations),
    "prompts": ("prompt", lambda t: [{"prompt": p} for p in t.train_prompts]),
    "prompts_eval": ("prompt", lambda t: [{"prompt": p} for p in t.eval_prompts]),
    "corpus": ("text", lambda t: [{"text": x} for x in t.corpus]),
}


def load_records(spec: str, kind: str, skip_invalid: bool = False, split: str | None = None,
                 task_seed: int = 0) -> Records:
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise KilterError(f"unknown built-in data {spec!r}; choose one of "
                              + ", ".join(f"builtin:{n}" for n in BUILTIN))
        native_kind, pick = BUILTIN[name]
        if native_kind != kind:
            raise KilterError(f"{spec} holds {native_kind} records, but {kind} records are needed here")
        from kilter.data.task import build_task

        return Records(rows=list(pick(build_task(seed=task_seed))), kind=kind, source=spec)
    return read_records(spec, kind, skip_invalid=skip_invalid, split=split)
