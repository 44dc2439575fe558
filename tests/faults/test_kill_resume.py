"""Kill every trainer at seeded random points -- between steps and inside checkpoint writes -- and resume.

Each trainer's uninterrupted run is made once (module fixture) and its fault points (every fsync,
rename, manifest, ``torch.save`` and metrics row: ``kill_at.py``) are counted in a second identical
run.  A real process is then SIGKILLed at seeded points and resumed with ``resume=true``: the
resumed run ends bit-identical to the uninterrupted one (every weight of final/, every metric but
wall time and speed), and no temporary folder is left.  Ctrl-C (SIGINT) stops a run cleanly with
exit 130 and the same resume.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

from kilter.cli import main
from kilter.runs import verify_manifest

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
TRAINERS = ("sft", "rm", "dpo", "kto", "ppo", "distill", "control")


def _kill_at_module():
    spec = importlib.util.spec_from_file_location("kill_at", HERE / "kill_at.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KILL_AT = _kill_at_module()


@pytest.fixture(scope="module")
def straight(faults, tiny_data, tmp_path_factory):
    """name -> (uninterrupted run folder, the sites of its fault points in order), made on first use."""
    made: dict[str, tuple[Path, list[str]]] = {}

    def get(name: str) -> tuple[Path, list[str]]:
        if name not in made:
            root = tmp_path_factory.mktemp(f"straight-{name}")
            assert main(faults.args(name, root / "run", tiny_data)) == 0
            events, undo = KILL_AT.install(0)
            try:
                assert main(faults.args(name, root / "counted", tiny_data)) == 0
            finally:
                undo()
            # the same seed gives the same run: the premise of every comparison below
            assert faults.same(faults.weights(root / "run"), faults.weights(root / "counted"))
            assert faults.metrics(root / "run") == faults.metrics(root / "counted")
            made[name] = (root / "run", events)
        return made[name]

    return get


def _assert_resumed_like_straight(faults, run: Path, reference: Path) -> None:
    assert faults.same(faults.weights(run), faults.weights(reference)), "final/ differs from the uninterrupted run"
    assert faults.metrics(run) == faults.metrics(reference)
    if (reference / "samples.jsonl").exists():  # ppo's sample table
        assert (run / "samples.jsonl").read_text() == (reference / "samples.jsonl").read_text()
    assert not [p for p in run.rglob(".*-tmp*")] and not [p for p in run.rglob(".*-old")]
    for ckpt in (run / "checkpoints").glob("step-*"):
        assert verify_manifest(ckpt) is None, ckpt


def _kill_points(name: str, events: list[str]) -> list[int]:
    """Three fault points (1-based): the one after the first metrics row (inside or before the first
    checkpoint, so resume=true starts afresh), one seeded anywhere, and one seeded inside a file write -- a half-written ``torch.save``,
    just before a manifest, or at a rename, in turn across the trainers."""
    rng = random.Random(f"issue-19-{name}")
    site = ("torch.save", "manifest", "replace")[TRAINERS.index(name) % 3]
    writes = [i + 1 for i, s in enumerate(events) if s == site]
    return list(dict.fromkeys([events.index("log") + 2, rng.randint(1, len(events)), rng.choice(writes)]))


def _run_and_kill(args: list[str], point: int, log: Path) -> int:
    """Run ``kilter ARGS`` in a forked child of this (already warmed-up) process and SIGKILL it at fault
    point ``point``; returns the signal that ended it.  A fork spares each kill the seconds of a fresh
    interpreter importing torch; ``kill_at.py`` does the same from a shell.  The child's output goes to ``log``."""
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no output, nothing after the kill
        try:
            out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(out, 2)
            sys.stdout = sys.stderr = open(out, "w", buffering=1, closefd=False)  # not pytest's capture
            KILL_AT.install(point, signal.SIGKILL)
            print(f"exit {main(args)} without being killed", file=sys.stderr)
        except BaseException:  # noqa: BLE001 -- shown in the test's failure, then the child ends
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(99)  # reached only when the kill did not come
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"kilter {' '.join(args)} did not reach fault point {point} in 300 s")


@pytest.mark.parametrize("name", TRAINERS)
def test_sigkill_anywhere_then_resume_equals_the_uninterrupted_run(name, faults, tiny_data, straight, tmp_path,
                                                                   capsys):
    reference, events = straight(name)
    tried = []
    for point in _kill_points(name, events):
        run = tmp_path / f"killed-at-{point}"
        args = faults.args(name, run, tiny_data)
        log = tmp_path / f"child-{point}.log"
        assert _run_and_kill(args, point, log) == signal.SIGKILL, f"not killed at {point}: {log.read_text()[-1500:]}"
        tried.append(f"{name}: SIGKILL at fault point {point}/{len(events)} ({events[point - 1]})")
        capsys.readouterr()
        assert main([*args, "resume=true"]) == 0, capsys.readouterr().err[-2000:]
        assert "Traceback" not in capsys.readouterr().err
        _assert_resumed_like_straight(faults, run, reference)
    print("\n".join(tried))  # what was tried, for -s


def test_kill_at_kills_a_real_process_from_the_shell(faults, tiny_data, straight, tmp_path):
    """The script the suite documents for a shell: a fresh interpreter killed inside a checkpoint write."""
    reference, events = straight("sft")
    point = events.index("manifest") + 1
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = faults.args("sft", tmp_path / "run", tiny_data)
    done = subprocess.run([sys.executable, str(HERE / "kill_at.py"), str(point), "KILL", *args],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-1500:]
    assert main([*args, "resume=true"]) == 0
    _assert_resumed_like_straight(faults, tmp_path / "run", reference)


@pytest.mark.parametrize("name", TRAINERS)
def test_ctrl_c_stops_cleanly_and_resumes(name, faults, tiny_data, straight, tmp_path, capsys):
    reference, events = straight(name)
    logs = [i + 1 for i, site in enumerate(events) if site == "log"]
    point = logs[len(logs) // 2]
    run = tmp_path / "run"
    args = faults.args(name, run, tiny_data)
    _, undo = KILL_AT.install(point, signal.SIGINT)
    try:
        code = main(args)
    finally:
        undo()
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "Traceback" not in err
    assert not (run / "final").exists()
    print(f"{name}: SIGINT at metrics row {logs.index(point) + 1}/{len(logs)}")
    assert main([*args, "resume=true"]) == 0
    _assert_resumed_like_straight(faults, run, reference)
