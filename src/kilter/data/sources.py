"""Resolve a data spec: a file/folder path, ``DIR:split``, or ``builtin:<name>`` for the built-in task.

Built-in names: ``sft`` / ``sft_eval`` (demonstrations), ``prompts`` / ``prompts_eval``
(prompts), ``corpus`` (text).  The built-in data is generated in memory, deterministically,
so tests and the demo never touch the network or the disk for data.  A suffix picks the
task's train/eval split (:mod:`kilter.data.task`): ``builtin:prompts_eval`` holds out 8
products (the default, ``@product``), ``builtin:prompts_eval@template`` holds out two prompt
phrasings of every product.

A folder saved by ``datasets``' ``DatasetDict.save_to_disk`` names its split after a colon
(``data/uf:test``); that split applies to that file only, and wins over ``data.split``.
Files are read in the public layouts of :mod:`kilter.data.formats` (``format="auto"``
judges the layout from the first row).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from kilter.data.formats import read_layout
from kilter.data.readers import Records
from kilter.errors import KilterError

__all__ = ["BUILTIN", "parse_builtin", "builtin_eval_spec", "hold_out", "load_records", "load_train_eval", "parse_spec", "resolve_eval_spec"]

log = logging.getLogger("kilter.data")

BUILTIN = {
    "sft": ("demonstration", lambda t: t.demonstrations),
    "sft_eval": ("demonstration", lambda t: t.eval_demonstrations),
    "prompts": ("prompt", lambda t: [{"prompt": p} for p in t.train_prompts]),
    "prompts_eval": ("prompt", lambda t: [{"prompt": p} for p in t.eval_prompts]),
    "corpus": ("text", lambda t: [{"text": x} for x in t.corpus]),
}


def parse_builtin(spec: str) -> tuple[str, str]:
    """``(name, split)`` of a ``builtin:NAME[@SPLIT]`` spec; an unknown name or split is a KilterError."""
    name, _, split = spec.split(":", 1)[1].partition("@")
    if name not in BUILTIN:
        raise KilterError(f"unknown built-in data {spec!r}; choose one of "
                          + ", ".join(f"builtin:{n}" for n in BUILTIN))
    split = split or "product"
    if split not in ("product", "template"):
        raise KilterError(f"unknown split {split!r} in {spec!r}; use builtin:{name}@product or builtin:{name}@template")
    return name, split


def builtin_eval_spec(train: str, builtin_eval: dict[str, str]) -> str | None:
    """The built-in eval set that matches a built-in ``train`` spec, keeping its split suffix.

    ``builtin_eval`` maps plain names (``{"builtin:sft": "builtin:sft_eval"}``); e.g.
    ``builtin:sft@template`` -> ``builtin:sft_eval@template``; None when ``train`` is not built-in.
    """
    base, sep, split = train.partition("@")
    if base not in builtin_eval:
        return None
    return builtin_eval[base] + (sep + split if sep else "")


def parse_spec(spec: str, split: str | None = None) -> tuple[str, str | None]:
    """``(path, split)`` of a spec; ``DIR:name`` picks a split of a saved DatasetDict folder."""
    if spec.startswith("builtin:") or Path(spec).exists() or ":" not in spec:
        return spec, split
    path, _, name = spec.rpartition(":")
    if path and name and Path(path).is_dir():
        return path, name
    return spec, split


def load_records(spec: str, kind: str, skip_invalid: bool = False, split: str | None = None,
                 task_seed: int = 0, format: str = "auto") -> Records:
    if spec.startswith("builtin:"):
        name, task_split = parse_builtin(spec)
        native_kind, pick = BUILTIN[name]
        if native_kind != kind:
            raise KilterError(f"{spec} holds {native_kind} records, but {kind} records are needed here")
        from kilter.data.task import build_task

        return Records(rows=list(pick(build_task(seed=task_seed, split=task_split))), kind=kind, source=spec)
    path, split = parse_spec(spec, split)
    records = read_layout(path, kind, format, skip_invalid=skip_invalid, split=split)
    for note in records.notes:
        log.warning("kilter: %s", note)
    return records


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows with about ``fraction`` of them, chosen at random by ``seed``, held out.

    At least one row is held out when ``fraction > 0`` and at least one stays for training.
    """
    if fraction <= 0 or len(rows) < 2:
        return list(rows), []
    order = list(range(len(rows)))
    random.Random(f"kilter-hold-out-{seed}").shuffle(order)
    n_held = min(max(round(fraction * len(rows)), 1), len(rows) - 1)
    held = set(order[:n_held])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def resolve_eval_spec(train: str, eval: str | None, builtin_eval: dict[str, str]) -> tuple[str | None, str]:
    """``(eval spec or None, why)`` for a command whose evaluation data cannot be held out of ``train``.

    ``eval="auto"`` is the built-in eval set matching a built-in ``train``, and none for the
    user's own data (never the built-in task's data next to someone else's).
    """
    if eval != "auto":
        return eval, f"{eval}" if eval else "none (null)"
    matched = builtin_eval_spec(train, builtin_eval)
    if matched is not None:
        return matched, matched
    return None, f"none (auto: {train} is not built-in; name held-out prompts to evaluate on)"


def load_train_eval(train: str, eval: str | None, kind: str, *, eval_fraction: float, seed: int,
                    builtin_eval: dict[str, str] | None = None, skip_invalid: bool = False,
                    split: str | None = None, task_seed: int = 0,
                    format: str = "auto") -> tuple[Records, Records | None, str]:
    """Training records, evaluation records (or None) and a line saying where evaluation comes from.

    ``eval="auto"``: the built-in eval set that matches a built-in ``train`` (``builtin_eval``
    maps one to the other), else ``eval_fraction`` of the training records held out (none
    when the fraction is 0).  A path (or ``DIR:split``) is read as it is; None: no evaluation.
    ``split`` applies to ``train`` only.
    """
    def read(spec: str, split: str | None) -> Records:
        return load_records(spec, kind, skip_invalid=skip_invalid, split=split, task_seed=task_seed, format=format)

    records = read(train, split)  # `split` is data.train's; data.eval names its own (DIR:split)
    if eval == "auto":
        eval = builtin_eval_spec(train, builtin_eval or {})
        if eval is None:
            if eval_fraction <= 0:
                return records, None, "none (data.eval_fraction=0)"
            kept, held = hold_out(records.rows, eval_fraction, seed)
            if not held:
                return records, None, f"none ({train} has too few records to hold some out)"
            train_part = Records(rows=kept, kind=kind, source=records.source, n_skipped=records.n_skipped,
                                 first_error=records.first_error, layout=records.layout, notes=records.notes)
            held_part = Records(rows=held, kind=kind, source=records.source, layout=records.layout)
            return train_part, held_part, f"{len(held)} records of {train} held out (data.eval_fraction={eval_fraction:g})"
    if eval is None:
        return records, None, "none (data.eval=null)"
    held_records = read(eval, None)
    return records, held_records, f"{len(held_records)} records of {eval}"
