"""Fast paths are decided once per model and run, visibly.

Kilter's speed-ups (padding-free rows, prompts shared by their k samples, its own KV-cached
sampler, completion-only logits) are each checked against the model's ordinary forward the
first time a model meets them.  :func:`decide` records the verdict: a fallback prints one
WARNING line with the reason (once per path and reason), ``strict`` turns it into an error,
and :func:`record` gives the verdicts as ``perf/<path>`` (1 used, 0 fell back) for
``metrics.jsonl``.  The registry is per process, reset by :func:`configure` when a run starts.
"""

from __future__ import annotations

import sys

from kilter.errors import KilterError

PROBE_ERRORS = (RuntimeError, TypeError, ValueError, AttributeError, IndexError, KeyError, NotImplementedError)
"""What a probe of an unfamiliar model may raise; it means "this fast path does not fit", never a crash."""

_strict = False
_verdicts: dict[str, bool] = {}
_warned: set[tuple[str, str]] = set()


def configure(strict: bool = False) -> None:
    """Start a run: forget earlier verdicts; with ``strict`` a fallback raises instead of warning."""
    global _strict
    _strict = bool(strict)
    _verdicts.clear()
    _warned.clear()


def decide(path: str, ok: bool, reason: str = "") -> bool:
    """Record whether fast path ``path`` is used; returns ``ok``.  A path is used only if every model passed."""
    _verdicts[path] = _verdicts.get(path, True) and bool(ok)
    if not ok:
        why = reason or "its check against the ordinary forward failed"
        if _strict:
            raise KilterError(f"fast path {path} does not fit this model ({why}); strict_fast_paths=true "
                              "makes that an error: set it to false to fall back")
        if (path, why) not in _warned:
            _warned.add((path, why))
            print(f"kilter: WARNING: fast path {path} is off for this model ({why}); using the ordinary path",
                  file=sys.stderr)
    return bool(ok)


def record() -> dict[str, float]:
    """``{"perf/<path>": 1.0 or 0.0}`` for every path decided so far in this run."""
    return {f"perf/{path}": 1.0 if used else 0.0 for path, used in sorted(_verdicts.items())}
