"""Precision: fp32, or bf16 autocast with fp32 master weights, the same way for every forward.

On a CPU, bf16 is only fast where oneDNN has bf16 kernels backed by the instructions for it
(AVX512-BF16 or AMX).  Without oneDNN bf16 support (an AVX2-only CPU, or oneDNN limited to
AVX2), every bf16 matrix product -- forward and backward, LoRA or not -- falls back to
PyTorch's reference loops: measured at 1 GFLOP/s against 35 for fp32 on one core, a training
step 10x slower at 64 tokens and 25-50x on real-length data (docs/performance.md).  With
oneDNN on AVX512 but no bf16 instructions, bf16 is emulated and matmuls run at about half the
fp32 speed.  In both cases ``precision=bf16`` runs in fp32 instead, announced in one line at
start-up (fp32 gives the numbers bf16 approximates, and faster); on a GPU nothing changes.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import sys
from typing import Literal

import torch

from kilter.errors import KilterError

Support = Literal["native", "emulated", "none"]


@functools.cache
def cpu_bf16_support() -> Support:
    """How this process's CPU runs bf16 matmuls: ``native`` (oneDNN with AVX512-BF16 or AMX),
    ``emulated`` (oneDNN on AVX512 without bf16 instructions) or ``none`` (PyTorch's reference
    loops).  Read once from torch's CPU flags; ``ONEDNN_MAX_CPU_ISA`` limits what oneDNN uses."""
    if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return "none"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "native"  # oneDNN enables bf16 on Arm only where the CPU has the bf16 instructions
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if limit in _NO_BF16_INSTRUCTIONS:
        return "emulated"
    if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
        return "native"
    return "emulated"


_NO_BF16_INSTRUCTIONS = ("AVX512_CORE", "AVX512_CORE_VNNI", "AVX2_VNNI_2")
"""oneDNN ISA limits under which it has bf16 kernels but not the AVX512-BF16/AMX instructions."""


_WHY = {
    "none": "this CPU has no oneDNN bf16 kernels (needs AVX512 or AMX), so bf16 matmuls run in reference loops, "
            "10-50x slower than fp32",
    "emulated": "this CPU has no bf16 instructions (AVX512-BF16 or AMX), so oneDNN emulates bf16 matmuls at about "
                "half the fp32 speed",
}


def route(precision: str, device_type: str, support: Support) -> tuple[str, str]:
    """(precision the forwards run in, reason when it differs from ``precision``).

    bf16 on a CPU whose ``support`` is not ``native`` runs in fp32; everything else as asked.
    """
    if precision == "bf16" and device_type == "cpu" and support != "native":
        return "fp32", _WHY[support]
    return precision, ""


_announced: set[str] = set()


def effective_precision(precision: str, device: str | torch.device) -> str:
    """The precision forwards on ``device`` run in (:func:`route` with this CPU's support); the
    first time bf16 is routed to fp32 in a run (:func:`check_precision` starts one), one WARNING
    line says so and why."""
    device_type = torch.device(device).type
    if precision != "bf16" or device_type != "cpu":
        return precision
    used, why = route(precision, device_type, cpu_bf16_support())
    if used != precision and why not in _announced:
        _announced.add(why)
        print(f"kilter: WARNING: precision=bf16 runs in fp32 on this CPU: {why} (docs/performance.md)",
              file=sys.stderr)
    return used


def autocast(precision: str, device: str):
    if effective_precision(precision, device) == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_precision(precision: str, device: str) -> None:
    """At start-up: refuse bf16 on a GPU without it; announce bf16 routed to fp32 on this CPU."""
    if precision == "bf16" and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KilterError("precision=bf16 but this GPU does not support bfloat16; use precision=fp32")
    _announced.clear()  # a new run says it again, once
    effective_precision(precision, device)
