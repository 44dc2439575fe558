"""state.json: where the loop is and what each finished stage produced; run_stage is the one place a stage runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kilter.commands.loop.config import LoopConfig
from kilter.errors import ConfigError, KilterError
from kilter.runs import atomic_write_text

STAGES = ("sample", "publish", "collect", "export", "reward", "policy", "evaluate")
STATE_VERSION = 1


class LoopState:
    """state.json: where the loop is, what each finished stage produced, how often each stage started."""

    def __init__(self, path: Path, data: dict[str, Any]):
        self.path, self.data = path, data

    @classmethod
    def load_or_start(cls, cfg: LoopConfig) -> LoopState:
        out = Path(cfg.output_dir)
        path = out / "state.json"
        if cfg.fresh and out.exists():
            shutil.rmtree(out)
        if path.exists():
            if not cfg.resume:
                raise ConfigError(f"{out} already holds a loop (state.json); pass resume=true to continue it "
                                  "or fresh=true to start again")
            try:
                data = json.loads(path.read_text())
            except ValueError as exc:
                raise KilterError(f"{path}: not valid JSON ({exc})") from None
            if data.get("version") != STATE_VERSION:
                raise KilterError(f"{path}: state version {data.get('version')!r}, this kilter writes {STATE_VERSION}")
            return cls(path, data)
        out.mkdir(parents=True, exist_ok=True)
        state = cls(path, {"version": STATE_VERSION, "done": {}, "started": {}, "rounds": {}, "policies": [],
                           "stopped": None})
        state.save()
        return state

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")

    def is_done(self, key: str) -> bool:
        return key in self.data["done"]

    def result(self, key: str) -> Any:
        return self.data["done"][key]

    def start(self, key: str) -> None:
        self.data["started"][key] = self.data["started"].get(key, 0) + 1
        self.save()

    def finish(self, key: str, result: Any) -> None:
        self.data["done"][key] = result
        self.save()


def run_stage(state: LoopState, key: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` unless ``key`` is recorded as done; record its result. The one place a stage runs."""
    if state.is_done(key):
        return state.result(key)
    print(f"== kilter loop: {key}", flush=True)
    round_, _, stage = key.rpartition(":")
    state.data["current"] = {"round": int(round_) if round_ else 0, "stage": stage}
    state.start(key)
    result = fn()
    state.finish(key, result)
    return result
