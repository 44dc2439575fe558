"""The one set-up call of a training run: threads, precision, seed, fast-path policy, run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import yaml

from kilter import fastpaths
from kilter.config import dump_config
from kilter.distributed import DistInfo, cleanup, init_distributed
from kilter.errors import ConfigError
from kilter.models.precision import check_precision
from kilter.runs import RunDir, clean_stale_temporaries
from kilter.training.optim import GUARD
from kilter.training.state import set_seed


def prepare(cfg, info: DistInfo, dirs: list[Path] | None = None) -> Path | None:
    """Threads, precision check, seeds and fast-path policy; returns the checkpoint to resume from.

    Refuses an ``output_dir`` (or any of ``dirs``, e.g. an ensemble's member folders) that already
    holds checkpoints unless ``resume=true``, before anything is written into it.  Returns the
    newest checkpoint of the first folder when resuming, else None.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_precision(cfg.precision, info.device)
    set_seed(cfg.seed)
    fastpaths.configure(strict=cfg.strict_fast_paths)
    folders = [Path(d) for d in (dirs or [Path(cfg.output_dir)])]
    root = Path(cfg.output_dir)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir {root} is a file, not a folder; choose another output_dir")
    found = [RunDir(d, writer=False).latest_checkpoint() for d in folders]
    if not cfg.resume and any(c is not None for c in found):
        raise ConfigError(f"output_dir {cfg.output_dir} already holds checkpoints; pass resume=true to continue "
                          "or choose another output_dir")
    finished = [p for d in {root, *folders} for p in (d / "final", d / "metrics.jsonl") if p.exists()]
    if finished and not cfg.resume and not cfg.overwrite:
        raise ConfigError(f"output_dir {cfg.output_dir} holds a previous run ({finished[0].name}); pass resume=true "
                          "to continue it, overwrite=true to replace it, or choose another output_dir")
    if cfg.resume and found[0] is not None:
        _check_resumed_config(cfg, root, info)
    if info.is_main:
        for d in folders:
            clean_stale_temporaries(d)  # what a kill left half-written; the newest complete checkpoint stays
    return found[0] if cfg.resume else None


def open_run_dir(cfg, info: DistInfo, path: str | Path | None = None) -> RunDir:
    """The run directory (written by the main process only): ``cfg.output_dir`` or ``path`` (an ensemble member's).

    Every row it logs carries the run's shared counters (``train/skipped_steps`` with ``nonfinite=skip``).
    """
    run_dir = RunDir(cfg.output_dir if path is None else path, writer=info.is_main, tensorboard=cfg.tensorboard,
                     report_to=cfg.report_to)
    GUARD.configure(cfg.nonfinite, cfg.max_skipped_steps)  # counts from zero; a resume restores them
    run_dir.row_extras = GUARD.metrics
    # A run that restores no checkpoint starts afresh: its first row replaces what metrics.jsonl holds
    # (overwrite=true, or resume=true after a kill before the first checkpoint) instead of following it;
    # restoring one truncates the file to the checkpoint instead (RunDir.truncate_metrics).  A run
    # refused before it logs anything leaves the file as it was.
    run_dir.replace_metrics = True
    return run_dir


def launch(train, cfg, name: str) -> int:
    """Run ``train(cfg, info)`` inside the process group ``torchrun`` set up (or a single process)."""
    info = init_distributed(cfg.device)
    try:
        return train(cfg, info)
    finally:
        cleanup(info)


RESUMABLE_CHANGES = ("output_dir", "resume", "resume_with_changes", "overwrite", "max_steps", "epochs", "iterations", "log_every",
                     "eval_every", "save_every", "sample_every", "keep_checkpoints", "threads", "tensorboard",
                     "report_to", "device", "n_samples", "strict_fast_paths", "nonfinite", "max_skipped_steps")
"""Keys a resumed run may change freely: how long it goes on and what it reports, not what it computes."""


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}{key}."))
    return {k.rstrip("."): v for k, v in out.items()}


def _check_resumed_config(cfg, root: Path, info: DistInfo) -> None:
    """Refuse a resume whose config changes what the run computes, unless resume_with_changes=true;
    every change is recorded in ``config_changes.jsonl`` (config.yaml is rewritten to the new one)."""
    saved_path = root / "config.yaml"
    if not saved_path.is_file():
        return
    try:
        saved = _flatten(yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError):
        return  # an unreadable old config proves nothing either way; the checkpoint itself was verified
    now = _flatten(yaml.safe_load(dump_config(cfg)) or {})
    changed = {k: (saved.get(k), now.get(k)) for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)}
    meaningful = [k for k in changed if k.split(".")[0] not in RESUMABLE_CHANGES]
    if meaningful and not getattr(cfg, "resume_with_changes", False):
        key = meaningful[0]
        raise ConfigError(f"resume=true but {key} changed ({changed[key][0]!r} -> {changed[key][1]!r}"
                          f"{f', and {len(meaningful) - 1} more' if len(meaningful) > 1 else ''}) since the run "
                          "started; pass resume_with_changes=true to continue anyway, or start a new output_dir")
    if changed and info.is_main:
        with open(root / "config_changes.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"time": round(time.time(), 3),
                                 "changes": {k: {"from": a, "to": b} for k, (a, b) in changed.items()}},
                                default=str) + "\n")
