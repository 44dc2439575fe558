"""A full disk and a read-only one, for real: a small tmpfs mounted for the test (we run as root, as CI does).

Each failure is one line and exit 2 with every checkpoint written so far intact; once the disk has
room again (or is writable again), ``resume=true`` ends bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kilter.cli import main
from kilter.runs import RunDir, verify_manifest


def _mount(path: Path, options: str) -> None:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root or "
                    "CAP_SYS_ADMIN, which CI has")


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


@pytest.fixture
def disk(tmp_path):
    """A folder on its own tmpfs; ``disk.mount(options)`` mounts it, unmounted after the test."""
    path = tmp_path / "disk"
    path.mkdir()
    mounted = []

    class Disk:
        root = path

        @staticmethod
        def mount(options: str) -> Path:
            _mount(path, options)
            mounted.append(path)
            return path

        @staticmethod
        def remount(options: str) -> None:
            _remount(path, options)

    yield Disk
    for p in mounted:
        subprocess.run(["umount", "-l", str(p)], capture_output=True)



def _intact(run: Path, steps: list[int]) -> None:
    assert sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*")) == steps
    assert all(verify_manifest(run / "checkpoints" / f"step-{s}") is None for s in steps)
    assert not list(run.rglob(".*-tmp*")) and not (run / "final").exists()


@pytest.fixture(scope="module")
def reference(faults, tiny_data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("disk-reference") / "run"
    assert main(faults.args("sft", run, tiny_data)) == 0
    return run


@pytest.mark.parametrize("check", ["free-space check", "no check: the OS says ENOSPC"])
def test_disk_full_is_one_line_keeps_the_checkpoints_and_resumes(check, disk, faults, tiny_data, reference, capsys,
                                                                 monkeypatch, one_line_error):
    size = sum(p.stat().st_size for p in (reference / "checkpoints" / "step-1").rglob("*") if p.is_file())
    root = disk.mount(f"size={int(size * 2.6) // 1024}k")  # room for two checkpoints, not three
    if check.startswith("no check"):
        monkeypatch.setattr(RunDir, "check_free_space", lambda self, folder, what, estimate: None)
    run = root / "run"
    code = main(faults.args("sft", run, tiny_data))
    needle = "not enough free space" if check == "free-space check" else "No space left on device"
    one_line_error(code, needle)
    _intact(run, [1, 2])
    disk.remount("size=64m")
    monkeypatch.undo()
    assert main([*faults.args("sft", run, tiny_data), "resume=true"]) == 0
    assert faults.same(faults.weights(run), faults.weights(reference))
    assert faults.metrics(run) == faults.metrics(reference)


def test_a_read_only_output_dir_is_one_line(disk, faults, tiny_data, capsys, one_line_error):
    root = disk.mount("ro,size=1m")
    one_line_error(main(faults.args("sft", root / "run", tiny_data)), "Read-only file system",
                    str(root / "run"))


def test_a_disk_turned_read_only_mid_run_is_one_line_and_resumes(disk, faults, tiny_data, reference, capsys,
                                                                 monkeypatch, one_line_error):
    root = disk.mount("size=64m")
    run = root / "run"
    real_log = RunDir.log

    def log_then_lock(self, step, metrics):
        real_log(self, step, metrics)
        if step == 2 and "loss/sft" in metrics:
            disk.remount("ro")  # the disk goes read-only after step 2 is logged, before its checkpoint

    monkeypatch.setattr(RunDir, "log", log_then_lock)
    one_line_error(main(faults.args("sft", run, tiny_data)), "Read-only file system")
    _intact(run, [1])
    monkeypatch.undo()
    disk.remount("rw")
    assert main([*faults.args("sft", run, tiny_data), "resume=true"]) == 0
    assert faults.same(faults.weights(run), faults.weights(reference))
    assert faults.metrics(run) == faults.metrics(reference)
