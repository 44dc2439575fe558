"""bf16 on CPU: where it runs in fp32 instead, and the one line that says so."""

import os
import subprocess
import sys

import pytest
import torch

from kilter.errors import KilterError
from kilter.models import precision


@pytest.mark.parametrize("support, want", [("native", "bf16"), ("emulated", "fp32"), ("none", "fp32")])
def test_bf16_on_a_cpu_runs_in_fp32_unless_the_cpu_has_bf16_instructions(support, want):
    used, why = precision.route("bf16", "cpu", support)
    assert used == want
    assert bool(why) == (want == "fp32")
    if support == "none":
        assert "reference loops" in why
    if support == "emulated":
        assert "emulates" in why


@pytest.mark.parametrize("support", ["native", "emulated", "none"])
def test_gpu_and_fp32_are_never_rerouted(support):
    assert precision.route("bf16", "cuda", support) == ("bf16", "")
    assert precision.route("fp32", "cpu", support) == ("fp32", "")


@pytest.fixture
def cpu_support(monkeypatch):
    """Pretend this CPU's bf16 support is the given kind, with nothing announced yet."""
    monkeypatch.setattr(precision, "_announced", set())

    def set_support(kind):
        monkeypatch.setattr(precision, "cpu_bf16_support", lambda: kind)
    return set_support


def test_routed_bf16_says_so_once_at_start_up_and_autocasts_nothing(cpu_support, capsys):
    cpu_support("none")
    precision.check_precision("bf16", "cpu")  # what training.setup.prepare calls first
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kilter: WARNING: precision=bf16 runs in fp32 on this CPU")
    assert "reference loops" in lines[0]
    with precision.autocast("bf16", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    assert precision.effective_precision("bf16", "cpu") == "fp32"
    assert capsys.readouterr().err == ""  # one line per run, not one per forward
    precision.check_precision("bf16", "cpu")  # the next run in this process says it again
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_native_bf16_autocasts_silently(cpu_support, capsys):
    cpu_support("native")
    precision.check_precision("bf16", "cpu")
    with precision.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    precision.check_precision("fp32", "cpu")
    assert capsys.readouterr().err == ""


def test_gpu_without_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(KilterError, match="does not support bfloat16"):
        precision.check_precision("bf16", "cuda")


@pytest.mark.parametrize("isa, want", [("AVX2", "none"), ("AVX512_CORE", "emulated")])
def test_cpu_support_is_read_from_what_onednn_may_use(isa, want):
    # ONEDNN_MAX_CPU_ISA=AVX2 is what an AVX2-only CPU looks like to torch (bf16 matmuls in reference
    # loops); AVX512_CORE one with AVX512 but without bf16 instructions (Skylake, Cascade Lake)
    code = "from kilter.models.precision import cpu_bf16_support; print(cpu_bf16_support())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == want
