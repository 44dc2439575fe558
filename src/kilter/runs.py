"""The run directory contract (DESIGN.md): config.yaml, metrics.jsonl, checkpoints/, final/.

Checkpoints are written into a temporary folder and renamed into place, so a kill in the
middle of a save leaves the previous checkpoint intact and never a half-written one.

**Experiment trackers.**  Every row written to metrics.jsonl also goes, with the same metric
names and step, to the trackers named in ``report_to``, each through its own client:

* ``tensorboard`` -- event files in ``<run>/tensorboard`` (``torch.utils.tensorboard``);
* ``wandb`` -- ``wandb.init(dir=<run>, name=<run folder>, config=<config.yaml>)``; the project
  is ``WANDB_PROJECT`` (default ``kilter``); ``WANDB_MODE=offline`` keeps it on disk;
* ``mlflow`` -- ``MlflowClient``: the server or store of ``MLFLOW_TRACKING_URI`` (e.g.
  ``file:./mlruns``), experiment ``MLFLOW_EXPERIMENT_NAME`` (default ``kilter``), the config as
  params;
* ``trackio`` -- ``trackio.init(project=TRACKIO_PROJECT or kilter, name=<run folder>)``, local
  by default (``TRACKIO_DIR``).

None is a dependency of Kilter: ``pip install 'kilter[trackers]'`` installs them all; naming
one that is not installed is a one-line error before training starts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml

from kilter import fastpaths
from kilter.config import dump_config
from kilter.errors import ConfigError, KilterError

Tracker = Literal["tensorboard", "wandb", "mlflow", "trackio"]
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "trackio": "trackio"}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-4, ...}``: nested config sections as dotted keys (MLflow params)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class _TensorBoard:
    """Event files in ``<run>/tensorboard``, opened at the run's first config or row (a run refused before
    then writes none).  A resumed run opens its writer with ``purge_step``, so TensorBoard drops what the
    interrupted run logged after the checkpoint, as metrics.jsonl does."""

    def __init__(self, run: Path, required: bool):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if required:
                raise
            SummaryWriter = None
        self._cls, self.path, self.writer = SummaryWriter, run / "tensorboard", None
        self.purge_step: int | None = None

    def start(self, config: dict) -> None:
        if self._cls is not None and self.writer is None:
            self.writer = self._cls(str(self.path), purge_step=self.purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _WandB:
    def __init__(self, run: Path, required: bool):
        import wandb

        self.wandb, self.path, self.run = wandb, run, None

    def start(self, config: dict) -> None:
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT") or "kilter", name=self.path.name,
                                   dir=str(self.path), config=config, reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class _MLflow:
    def __init__(self, run: Path, required: bool):
        from mlflow.tracking import MlflowClient

        self.client, self.path, self.run_id = MlflowClient(), run, None

    def start(self, config: dict) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kilter"
        try:
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=self.path.name).info.run_id
        except MlflowException as exc:  # a tracking URI it cannot use: say so in one line
            raise ConfigError(f"report_to mlflow: {str(exc).splitlines()[0]}") from None
        params = [Param(k, json.dumps(v) if not isinstance(v, str) else v) for k, v in _flat(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id)


class _Trackio:
    def __init__(self, run: Path, required: bool):
        import trackio

        self.trackio, self.path, self.run = trackio, run, None

    def start(self, config: dict) -> None:
        self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT") or "kilter", name=self.path.name,
                                     config=config, embed=False, auto_log_cpu=False, auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


_CLIENTS = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow, "trackio": _Trackio}


class RunDir:
    """One training run's folder.  Only the main process should create one with ``writer=True``.

    ``report_to`` names the experiment trackers that receive every logged row (module
    docstring); ``tensorboard=True`` adds TensorBoard when it is installed, silently otherwise.
    """

    def __init__(self, path: str | Path, writer: bool = True, tensorboard: bool = True,
                 report_to: list[str] | tuple[str, ...] = ()):
        self.path = Path(path)
        self.writer = writer
        # decisions made before this run opened (an earlier run in the same process) are not this run's
        self._fast_paths: dict[str, float] = fastpaths.record()
        self._trackers: list = []
        self._started = False
        self.row_extras: Callable[[], dict[str, Any]] | None = None
        """Values every logged row carries (the training layer's shared counters), or None."""
        self.replace_metrics = False
        """The first row logged replaces an existing metrics.jsonl instead of being appended (a fresh start)."""
        unknown = [t for t in report_to if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"report_to: unknown tracker {unknown[0]!r}; expected some of {', '.join(TRACKERS)}")
        if writer:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "checkpoints").mkdir(exist_ok=True)
            clean_stale_temporaries(self.path)  # what a kill left half-written (every command's run folder)
            names = list(dict.fromkeys(([] if not tensorboard or "tensorboard" in report_to else ["tensorboard"])
                                       + list(report_to)))
            for name in names:
                try:
                    self._trackers.append(_CLIENTS[name](self.path, required=name in report_to))
                except ImportError:
                    raise ConfigError(f"report_to names {name}, which is not installed: pip install {_PACKAGES[name]} "
                                      "(or pip install 'kilter[trackers]')") from None

    def _start_trackers(self, config: dict) -> None:
        if not self._started:
            self._started = True
            for tracker in self._trackers:
                if self.replace_metrics and isinstance(tracker, _TensorBoard):
                    tracker.purge_step = 0  # a fresh start: the old run's events are dropped with its metrics
                tracker.start(config)

    # ------------------------------------------------------------------ files
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def final(self) -> Path:
        return self.path / "final"

    def write_config(self, cfg) -> None:
        if self.writer:
            text = dump_config(cfg)
            atomic_write_text(self.path / "config.yaml", text)
            self._start_trackers(yaml.safe_load(text))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one JSON line ``{"step": N, "time": t, <namespaced keys>}`` and flush it."""
        if not self.writer:
            return
        row = {"step": int(step), "time": round(time.time(), 3)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        if self.row_extras is not None:
            row.update(self.row_extras())
        # which fast paths the run uses (perf/padding_free, ...), in the first row after each decision
        decided = fastpaths.record()
        row.update({k: v for k, v in decided.items() if self._fast_paths.get(k) != v})
        self._fast_paths = decided
        with open(self.path / "metrics.jsonl", "w" if self.replace_metrics else "a") as fh:
            fh.write(json.dumps(row) + "\n")
        self.replace_metrics = False
        if self._trackers:
            self._start_trackers({})  # a command that logs without writing its config first
            scalars = {k: v for k, v in row.items()
                       if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for tracker in self._trackers:
                tracker.log(int(step), scalars)

    def truncate_metrics(self, after_step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file reads like one run (TensorBoard too;
        wandb, MLflow and trackio start a new run of their own on each start, which holds no stale rows)."""
        self.replace_metrics = False  # resumed: the rows up to the checkpoint stay
        for tracker in self._trackers:
            if isinstance(tracker, _TensorBoard) and tracker.writer is None:
                tracker.purge_step = int(after_step) + 1  # events after the checkpoint are dropped too
        path = self.path / "metrics.jsonl"
        if not self.writer or not path.exists():
            return
        kept = [json.dumps(row) for row in _metric_rows(path) if row.get("step", 0) <= after_step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, write: Callable[[Path], None], keep: int | None = None,
                        estimate: int | None = None) -> Path | None:
        """Write ``checkpoints/step-N`` atomically, after checking there is room for it.

        The room a checkpoint needs is the size of the newest one (or ``estimate`` bytes before the
        first); when the disk has less free, the save is not started: one line names the folder and
        the need, and the last good checkpoint is intact.
        """
        if not self.writer:
            return None
        target = self.checkpoints / f"step-{step}"
        self.check_free_space(self.checkpoints, f"checkpoint step-{step}", estimate)

        def write_and_seal(tmp: Path) -> None:
            write(tmp)
            write_manifest(tmp)  # last: a checkpoint with a manifest that matches is complete

        save_folder_atomically(target, write_and_seal)
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
        """The newest checkpoint whose files match its manifest; a damaged newer one is skipped with a WARNING."""
        for ckpt in reversed(self.list_checkpoints()):
            problem = verify_manifest(ckpt)
            if problem is None:
                return ckpt
            print(f"kilter: WARNING: checkpoint {ckpt} is damaged ({problem}); using an older one", file=sys.stderr)
        return None

    def save_final(self, write: Callable[[Path], None]) -> Path | None:
        if not self.writer:
            return None
        self.check_free_space(self.path, "final/", None)
        return save_folder_atomically(self.final, write)

    def check_free_space(self, folder: Path, what: str, estimate: int | None) -> None:
        """Raise one line when ``folder``'s disk has less free space than ``what`` will take (newest checkpoint's size)."""
        newest = self.list_checkpoints()[-1:]
        need = _folder_bytes(newest[0]) if newest else (estimate or 0)
        if need <= 0:
            return
        folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < need:
            kept = f"the last checkpoint ({newest[0].name}) is intact" if newest else "nothing was written"
            raise KilterError(f"not enough free space in {folder} for {what}: it needs about {_mb(need)}, "
                              f"{_mb(free)} are free; free some space (or lower keep_checkpoints) and resume=true; "
                              f"{kept}")


MANIFEST = "manifest.json"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file's size and sha256 in ``folder/manifest.json`` (written last, then fsynced)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    path = folder / MANIFEST
    path.write_text(json.dumps({"files": entries}, indent=1) + "\n")
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def verify_manifest(folder: Path) -> str | None:
    """None when ``folder`` matches its manifest, else what is wrong (a checkpoint without one is trusted as before)."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        try:
            json.loads((folder / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            return "trainer_state.json is unreadable"
        return None
    try:
        entries = json.loads(path.read_text())["files"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return "its manifest is unreadable"
    for name, want in entries.items():
        file = folder / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["size"]:
            return f"{name} has {file.stat().st_size} bytes, {want['size']} were written"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` and the folder itself, so a power loss cannot leave empty files behind."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _fsync_dir(d)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_reporting_a_full_disk(write: Callable[[Path], None], tmp: Path) -> None:
    """``write(tmp)``; a writer that hides the OS's error (safetensors, torch say "unexpected pos ...")
    on a disk left with no room raises the OSError a full disk is: one line for the CLI."""
    try:
        write(tmp)
    except (RuntimeError, ValueError) as exc:
        if shutil.disk_usage(tmp.parent).free < 1 << 20:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp.parent)) from exc
        raise


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
        _write_reporting_a_full_disk(write, tmp)
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
        _write_reporting_a_full_disk(write, tmp)
        _fsync_tree(tmp)
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
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _metric_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short by a kill is dropped, a broken earlier one is an error."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the write that a kill interrupted
            raise ConfigError(f"{path}:{number}: not a JSON object; the metrics file is damaged") from None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return _metric_rows(path)


def clean_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the ``.step-N-tmp*``, ``.final-tmp*`` and ``*-old`` folders a kill left behind; returns them."""
    root = Path(run_dir)
    stale = [*root.glob(".final-tmp*"), *root.glob(".final-old"), *(root / "checkpoints").glob(".step-*-tmp*"),
             *(root / "checkpoints").glob(".step-*-old")]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
