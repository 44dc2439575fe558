"""Precision: fp32, or bf16 autocast with fp32 master weights, the same way for every forward."""

from __future__ import annotations

import contextlib

import torch

from kilter.errors import KilterError


def autocast(precision: str, device: str):
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_precision(precision: str, device: str) -> None:
    if precision == "bf16" and torch.device(device).type == "cuda" and not torch.cuda.is_bf16_supported():
        raise KilterError("precision=bf16 but this GPU does not support bfloat16; use precision=fp32")
