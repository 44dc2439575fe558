"""The one set-up call of a training run: threads, precision, seed, fast-path policy, run directory."""

from __future__ import annotations

from pathlib import Path

import torch

from kilter import fastpaths
from kilter.distributed import DistInfo, cleanup, init_distributed
from kilter.errors import ConfigError, KilterError
from kilter.models.precision import check_precision
from kilter.runs import RunDir
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
    found = [RunDir(d, writer=False).latest_checkpoint() for d in (dirs or [Path(cfg.output_dir)])]
    if not cfg.resume and any(c is not None for c in found):
        raise ConfigError(f"output_dir {cfg.output_dir} already holds checkpoints; pass resume=true to continue "
                          "or choose another output_dir")
    return found[0] if cfg.resume else None


def open_run_dir(cfg, info: DistInfo) -> RunDir:
    """The run directory (written by the main process only)."""
    return RunDir(cfg.output_dir, writer=info.is_main, tensorboard=cfg.tensorboard, report_to=cfg.report_to)


def launch(train, cfg, name: str, single_process: bool = False) -> int:
    """Run ``train(cfg, info)`` inside the process group ``torchrun`` set up (or a single process).

    ``single_process`` commands refuse to start under torchrun with one clear line.
    """
    info = init_distributed(cfg.device)
    try:
        if single_process and info.enabled:
            raise KilterError(f"kilter {name} runs in one process; launch it without torchrun")
        return train(cfg, info)
    finally:
        cleanup(info)
