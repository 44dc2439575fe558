"""Run ``kilter ARGS...`` and kill it at its N-th fault point: ``python kill_at.py N SIGNAL ARGS...``.

The fault points are every call of what a run does to its files and its log: ``os.fsync`` and
``os.replace`` (inside every atomic write and checkpoint rename), :func:`kilter.runs.write_manifest`
(the last file of a checkpoint), ``torch.save`` (optimizer state: the kill lands half-way through
that file, which is cut to half its size first) and :meth:`kilter.runs.RunDir.log` (between steps).
``N = 0`` kills nothing and prints ``fault points: <n> (<site>:<count> ...)`` at exit.  SIGNAL is
KILL (nothing runs after it) or INT (Ctrl-C: the command stops cleanly with exit 130).

The test suite imports :func:`install` to count the fault points of a run in-process.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path


def install(kill_at: int, sig: int = signal.SIGKILL) -> tuple[list[str], Callable[[], None]]:
    """Wrap every fault point; at the ``kill_at``-th (1-based; 0: never) send ``sig`` to this process.

    Returns the list that records each fault point's site as it passes, and a function that unwraps them.
    """
    import torch

    import kilter.runs

    events: list[str] = []
    originals: list[tuple[object, str, object]] = []

    def point(site: str, before=None) -> None:
        events.append(site)
        if len(events) == kill_at:
            if before is not None:
                before()
            os.kill(os.getpid(), sig)

    def wrap(owner, name: str, site: str, half_written: bool = False) -> None:
        real = getattr(owner, name)
        originals.append((owner, name, real))

        def wrapped(*args, **kwargs):
            if half_written:
                def cut() -> None:
                    real(*args, **kwargs)
                    target = args[1] if len(args) > 1 else kwargs.get("f")
                    if hasattr(target, "fh"):  # kilter.training.state.torch_save's file
                        target.fh.flush()
                        target = target.fh.name
                    if isinstance(target, (str, Path)) and Path(target).is_file():
                        size = Path(target).stat().st_size
                        with open(target, "r+b") as fh:
                            fh.truncate(size // 2)

                point(site, cut)
            else:
                point(site)
            return real(*args, **kwargs)

        setattr(owner, name, wrapped)

    wrap(os, "fsync", "fsync")
    wrap(os, "replace", "replace")
    wrap(kilter.runs, "write_manifest", "manifest")
    wrap(torch, "save", "torch.save", half_written=True)
    wrap(kilter.runs.RunDir, "log", "log")

    def undo() -> None:
        for owner, name, real in reversed(originals):
            setattr(owner, name, real)

    return events, undo


def main() -> int:
    kill_at, sig, argv = int(sys.argv[1]), getattr(signal, f"SIG{sys.argv[2]}"), sys.argv[3:]
    events, _ = install(kill_at, sig)
    from kilter.cli import main as kilter_main

    code = kilter_main(argv)
    if kill_at == 0:
        detail = " ".join(f"{k}:{v}" for k, v in sorted(collections.Counter(events).items()))
        print(f"fault points: {len(events)} ({detail})", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
