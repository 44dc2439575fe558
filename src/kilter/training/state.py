"""Seeds, RNG state and the training state saved beside a checkpoint's weights (optimizers, schedulers, step)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kilter.training.optim import GUARD


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_trainer_state(path: Path, state: dict[str, Any]) -> None:
    (Path(path) / "trainer_state.json").write_text(json.dumps(state, indent=2))


def read_trainer_state(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def save_training_state(path: Path, optimizers: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """Optimizers/schedulers (anything with state_dict) and RNG, next to the model files."""
    blob = {name: obj.state_dict() for name, obj in optimizers.items()}
    blob["rng"] = rng_state()
    blob["nonfinite"] = GUARD.state_dict()  # skipped updates so far, for train/skipped_steps after a resume
    if extra:
        blob["extra"] = extra
    torch_save(blob, Path(path) / "training_state.pt")


class _WriteRecorder:
    """A file for ``torch.save`` that remembers the OSError of a failed write: torch reports a full
    disk as ``RuntimeError: unexpected pos ...``, this keeps the OS's own words."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def torch_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``; a write the OS refused (disk full, read-only) raises that OSError."""
    with open(path, "wb") as fh:
        recorder = _WriteRecorder(fh)
        try:
            torch.save(obj, recorder)
        except RuntimeError:
            if recorder.error is not None:
                raise OSError(recorder.error.errno, recorder.error.strerror, str(path)) from None
            raise


def load_training_state(path: Path, optimizers: dict[str, Any]) -> dict[str, Any]:
    blob = torch.load(Path(path) / "training_state.pt", weights_only=False)
    for name, obj in optimizers.items():
        obj.load_state_dict(blob[name])
    set_rng_state(blob["rng"])
    GUARD.load_state_dict(blob.get("nonfinite", {}))
    return blob.get("extra", {})
