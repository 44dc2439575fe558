"""torch.distributed glue for data-parallel training launched by ``torchrun``.

One process per device; gloo on CPU, NCCL on GPU.  Rank 0 alone writes files and logs.
Without torchrun's environment everything degrades to a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from kilter.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(spec: str, key: str = "device") -> str:
    """The torch device a ``device=`` value names, checked to exist here: auto (cuda when available), cpu,
    cuda, cuda:N, mps, ...; anything else, or a device this machine's torch cannot use, is one line."""
    spec = str(spec).strip()
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={spec!r} is not a device; expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return "cpu"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"{key}={spec} but {why}; use {key}=cpu or {key}=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={spec} but only {torch.cuda.device_count()} CUDA device(s) are visible "
                              f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
        return str(dev)
    backend = getattr(torch.backends, dev.type, None) or getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ConfigError(f"{key}={spec}: no {dev.type} device is available to this torch; use {key}=cpu or "
                          f"{key}=auto")
    return str(dev)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun set up (if any) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device)
    if device == "cuda":
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if world > 1 and not dist.is_initialized():
        # KILTER_DIST_TIMEOUT_S: how long a collective may wait for the slowest rank (torch's
        # default is 10 min; rank 0 gathering and writing a large final/ can take longer).
        timeout = os.environ.get("KILTER_DIST_TIMEOUT_S")
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo",
                                timeout=timedelta(seconds=float(timeout)) if timeout else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=device)


def all_reduce_sum(value: torch.Tensor | float, info: DistInfo) -> torch.Tensor:
    t = value.detach().clone() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
    t = t.to(torch.float64 if t.device.type == "cpu" else t.dtype)
    if info.enabled:
        if t.device.type == "cpu" and info.device.startswith("cuda"):
            # NCCL reduces GPU tensors only; trainers keep their running sums on the CPU.
            on_device = t.to(info.device)
            dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
            return on_device.cpu()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
