"""The run directory contract (DESIGN.md): config.yaml, metrics.jsonl, checkpoints/, final/.

Checkpoints are written into a temporary folder and renamed into place, so a kill in the
middle of a save leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from kilter import fastpaths
from kilter.config import dump_config


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunDir:
    """One training run's folder.  Only the main process should create one with ``writer=True``."""

    def __init__(self, path: str | Path, writer: bool = True, tensorboard: bool = True):
        self.path = Path(path)
        self.writer = writer
        self._tb = None
        self._fast_paths: dict[str, float] = {}
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.path / "tensorboard"))
                except Exception:  # noqa: BLE001 - TensorBoard is optional
                    self._tb = None

    # ------------------------------------------------------------------ files
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    def write_config(self, cfg) -> None:
        if self.writer:
            atomic_write_text(self.path / "config.yaml", dump_config(cfg))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one JSON line ``{"step": N, "time": t, <namespaced keys>}`` and flush it."""
        if not self.writer:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        # which fast paths the run uses (perf/padding_free, ...), in the first row after each decision
        decided = fastpaths.record()
        row.update({k: v for k, v in decided.items() if self._fast_paths.get(k) != v})
        self._fast_paths = decided
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file reads like one run."""
        path = self.path / "metrics.jsonl"
        if not self.writer or not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= after_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep: int | None = None) -> Path | None:
        if not self.writer:
            return None
        target = self.checkpoints / f"step-{step}"
        save_folder_atomically(target, write)
        if keep:
            for old in self.list_checkpoints()[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
        return target

    def list_checkpoints(self) -> list[Path]:
        found = []
        if self.checkpoints.is_dir():
            for p in self.checkpoints.iterdir():
                m = re.fullmatch(r"step-(\d+)", p.name)
                if m and p.is_dir() and (p / "trainer_state.json").is_file():
                    found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        ckpts = self.list_checkpoints()
        return ckpts[-1] if ckpts else None

    def save_final(self, write: Callable[[Path], None]) -> Path | None:
        if not self.writer:
            return None
        return save_folder_atomically(self.final, write)


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)``, fsync it, then rename it over ``path``: readers see the old file or the new one.

    The one atomic file writer (run files, data files, caches): a crash mid-write leaves any
    previous file untouched and no half-written one behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; run and data files are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_folder_atomically(target: Path, write: Callable[[Path], None], keep_existing: bool = False) -> Path:
    """Write into ``.target-tmp*`` then swap it in; an existing ``target`` is replaced only at the end.

    With ``keep_existing`` a target that appeared meanwhile (another process built the same
    folder) wins and the new copy is discarded, so concurrent builders of a cache are safe.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-tmp", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        write(tmp)
        if target.exists() and keep_existing:
            shutil.rmtree(tmp, ignore_errors=True)
        elif target.exists():
            old = target.with_name(f".{target.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
