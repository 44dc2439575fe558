"""Epoch order, micro-batches and gradient accumulation: one implementation for every trainer.

The order of an epoch is a pure function of (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import math
import random

from kilter.data.collate import length_bucketed_batches
from kilter.distributed import DistInfo
from kilter.training.parallel import requires_gradient_sync


def epoch_batches(lengths: list[int], global_batch: int, seed: int, epoch: int, by_length: bool) -> list[list[int]]:
    """The global batches of one epoch; a pure function of (seed, epoch), which makes resume exact."""
    if by_length:
        return length_bucketed_batches(lengths, global_batch, seed=seed * 1000 + epoch, drop_last=True)
    order = list(range(len(lengths)))
    random.Random(seed * 1000 + epoch).shuffle(order)
    return [order[i:i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]


def micro_batches(indices: list[int], n: int) -> list[list[int]]:
    size = max(1, math.ceil(len(indices) / n))
    return [indices[i:i + size] for i in range(0, len(indices), size)]


def accumulation_context(ddp_model, info: DistInfo, last: bool):
    """Gradients are reduced across processes once per optimizer step, not once per micro-batch:
    ``no_sync()`` on every micro-batch but the last under DDP; under FSDP the reduce-scatter is
    switched off the same way (``set_requires_gradient_sync``, the FSDP2 form of no_sync)."""
    if not info.enabled:
        return contextlib.nullcontext()
    if requires_gradient_sync(ddp_model, last):
        return contextlib.nullcontext()
    return ddp_model.no_sync() if not last else contextlib.nullcontext()
