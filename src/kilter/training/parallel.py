"""Data parallel or fully sharded: the one place a trainer's model is wrapped for ``torchrun``.

``parallel=ddp`` (the default) keeps a full copy of the weights, gradients and optimizer state
on every process and all-reduces gradients (DistributedDataParallel).  ``parallel=fsdp`` shards
all three across the processes with FSDP2 (``torch.distributed.fsdp.fully_shard``): each
decoder block is one shard group, the root (embeddings, final norm, head) another, so a block's
full weights exist only while it computes.  docs/distributed.md says when to use which.

What changes for the rest of a trainer under FSDP is kept behind these functions:

* :func:`wrap_model` before the optimizer is built (FSDP replaces the parameters by sharded
  DTensors, which the optimizer must hold);
* :func:`kilter.training.batching.accumulation_context`: ``set_requires_gradient_sync`` instead
  of ``no_sync``;
* :func:`kilter.training.optim.clip_and_norm`: the norm of sharded gradients is a DTensor;
* :func:`gathered` around anything that runs the model on one rank alone or a different number
  of times per rank (samples printed by rank 0, evaluation over uneven shards, generation):
  every FSDP forward is a collective, so those would otherwise wait forever;
* :mod:`kilter.training.checkpoint`: sharded checkpoints through ``torch.distributed.checkpoint``
  and a plain Hugging Face ``final/`` gathered on rank 0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

from kilter.distributed import DistInfo, broadcast_object
from kilter.errors import ConfigError
from kilter.models.precision import effective_precision

Parallel = Literal["ddp", "fsdp"]

_ROOT = "_kilter_fsdp_root"
_RESHARD = "_kilter_reshard_after_forward"


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of ``model`` (PEFT-wrapped or not), in order.

    Hugging Face models name their block class in ``_no_split_modules`` (LlamaDecoderLayer, ...);
    a model without it falls back to the longest ``ModuleList`` of identical modules.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len({type(m) for m in module}) == 1 and len(module) > len(best):
            best = list(module)
    return best


def mixed_precision(precision: str):
    """bf16 weights in forward/backward with gradients reduced in fp32 (fp32 master weights stay
    sharded in the optimizer); fp32 runs compute in fp32 throughout."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap_model(run_module: torch.nn.Module, model: torch.nn.Module, cfg, info: DistInfo,
               frozen: bool = False) -> torch.nn.Module:
    """The module a trainer runs forward/backward through, under ``cfg.parallel`` (ddp or fsdp).

    ``run_module`` is ``model`` itself or a module that holds it (the completion-only logits
    wrapper).  One process: returned as it is.  DDP: wrapped in DistributedDataParallel.  FSDP:
    ``fully_shard`` on every decoder block of ``model``, then on ``run_module`` as the root; the
    modules are changed in place (``model`` keeps working, its parameters are now DTensors), so
    call this before :func:`kilter.training.optim.make_optimizer`.

    ``frozen``: a model that only runs forward (PPO's reference copy under FSDP): every group,
    the root included, frees its full weights after each forward, so it costs 1/N of its
    weights per process plus one block at a time.
    """
    mode = getattr(cfg, "parallel", "ddp")
    if not info.enabled:
        return run_module
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(
            run_module, device_ids=None if info.device == "cpu" else [info.local_rank])
    from torch.distributed.fsdp import fully_shard

    blocks = decoder_blocks(model)
    if not blocks:
        raise ConfigError(f"parallel=fsdp: found no decoder blocks in {type(model).__name__} to shard; "
                          "use parallel=ddp for this model")
    policy = mixed_precision(effective_precision(cfg.precision, info.device))  # bf16 on a CPU without it: fp32
    for block in blocks:
        # Blocks free their full weights after forward (re-gathered for backward): the memory saving.
        fully_shard(block, mp_policy=policy, reshard_after_forward=True)
        object.__setattr__(block, _RESHARD, True)
    # The rest (embeddings, final norm, head): one group per module that owns them, modules that
    # share a tensor (tied embeddings and head) in one group.  Not one root group: the
    # completion-only wrapper calls the decoder and the head directly and the frozen reference
    # (the adapter-disabled policy) calls the model itself, so only hooks on the modules that
    # really run gather their weights.  Kept gathered between forward and backward, as FSDP's
    # root would be.
    outside = _groups_outside(blocks, model, run_module)
    for group in outside:
        fully_shard(group if len(group) > 1 else group[0], mp_policy=policy, reshard_after_forward=frozen)
    fully_shard(run_module, mp_policy=policy, reshard_after_forward=frozen)  # the root: what is left
    for module in [run_module, *(m for g in outside for m in g)]:
        object.__setattr__(module, _RESHARD, frozen)
    # FSDP settles which module is the root at the first forward; the first forward may be through
    # the inner model (rank 0's samples) when the root is a wrapper, so settle it now.  (A private
    # call: torch is pinned, and tests/smoke/test_fsdp.py runs this path.)
    run_module._get_fsdp_state()._lazy_init()
    object.__setattr__(model, _ROOT, run_module)
    return run_module


def _groups_outside(blocks: list[torch.nn.Module], model: torch.nn.Module, run_module: torch.nn.Module
                    ) -> list[list[torch.nn.Module]]:
    """The modules below ``model`` that own parameters outside ``blocks``, those sharing a tensor
    joined (tied embeddings); parameters owned by ``model`` or ``run_module`` themselves stay
    with the root."""
    inside = {id(p) for b in blocks for p in b.parameters()}
    block_modules = {id(m) for b in blocks for m in b.modules()}
    groups: list[list[torch.nn.Module]] = []
    tensors: list[set[int]] = []
    for module in reversed(list(model.modules())):  # children before their parents
        if module is model or module is run_module or id(module) in block_modules:
            continue
        own = {id(p) for p in module.parameters(recurse=False) if id(p) not in inside}
        if not own:
            continue
        joined = [i for i, t in enumerate(tensors) if t & own]
        group, members = [module], set(own)
        for i in reversed(joined):
            group = groups.pop(i) + group
            members |= tensors.pop(i)
        groups.append(group)
        tensors.append(members)
    return groups


def is_sharded(model: torch.nn.Module) -> bool:
    """True when ``model``'s parameters are FSDP-sharded DTensors."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    root = getattr(model, _ROOT, model)
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module):
    """Inside: ``model``'s full weights on every rank, so each rank may run it alone and any number
    of times (rank 0's samples, evaluation over uneven shards, generation).  Entering is a
    collective (every rank must enter); nothing is trained inside.  A no-op unless FSDP-sharded.

    The memory inside is that of an unsharded model (as under DDP, without its gradients and
    optimizer state); leaving frees it again.
    """
    modules = _fsdp_modules(model)
    if not modules:
        yield model
        return
    for m in modules:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(getattr(m, _RESHARD, True))
        _forget_forward_order(modules)


def _forget_forward_order(modules: list) -> None:
    """Drop the forward order FSDP recorded inside :func:`gathered`.

    FSDP2 prefetches backward all-gathers in the reverse order of the forwards it saw since the
    last backward; forwards that only one rank ran (rank 0's samples through the inner model)
    would make that rank prefetch other blocks than the rest, and the next backward would wait
    forever.  FSDP forgets the order at the end of each backward; this does the same here.
    (Private attributes: torch is pinned, tests/smoke/test_fsdp.py runs this path.)
    """
    for m in modules:
        state = m._get_fsdp_state()
        state._comm_ctx.post_forward_order.clear()
        for group in state._fsdp_param_groups:
            group._post_forward_indices.clear()


def requires_gradient_sync(module: torch.nn.Module, sync: bool) -> bool:
    """Turn FSDP's gradient reduce-scatter on/off for ``module``; False when it is not FSDP."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        return False
    module.set_requires_gradient_sync(sync)
    return True


@dataclass(frozen=True)
class Ranks:
    """The processes one data-parallel update spans, and the collectives an RL update needs between them.

    ``kilter ppo`` takes its with-grad forwards through several entry points (the padding-free
    scoring wrapper, the fused first pass, the pretraining mix) and its reference is often the
    adapter-disabled policy itself, so its replicated mode does not wrap the model in
    DistributedDataParallel (whose hooks fire on the wrapper's own forward only): every rank
    holds the full weights and :meth:`sync_gradients` averages the gradients once per optimizer
    step (one all-reduce per bucket), the same arithmetic as DDP without its overlap of
    communication with the backward pass.  Under FSDP the sharded modules reduce-scatter their
    gradients themselves and :meth:`sync_gradients` does nothing.  One process: every method is
    the identity.
    """

    info: DistInfo
    sharded: bool = False

    @property
    def world(self) -> int:
        return self.info.world_size

    @property
    def enabled(self) -> bool:
        return self.info.enabled

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (a new tensor on ``t``'s device; ``t`` itself is left alone)."""
        if not self.enabled:
            return t
        out = t.detach().to(self._device(), copy=True)  # NCCL reduces device tensors only
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def mean(self, value: float) -> float:
        """A float averaged over the ranks."""
        if not self.enabled:
            return float(value)
        return float(self.sum(torch.tensor(float(value), dtype=torch.float64, device=self._device()))) / self.world

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Equal-length 1-D tensors of every rank concatenated in rank order."""
        if not self.enabled:
            return t
        local = t.detach().to(self._device()).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(t.device)

    def gather_objects(self, obj) -> list:
        """One picklable object per rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank."""
        return broadcast_object(obj, self.info)

    def broadcast_module(self, module: torch.nn.Module | None) -> None:
        """Rank 0's parameters and buffers into every rank's replica (replicated mode; as DDP does at start)."""
        if not self.enabled or self.sharded or module is None:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def sync_gradients(self, module: torch.nn.Module | None, bucket: int = 1 << 24) -> None:
        """Average the gradients of a replicated ``module`` over the ranks, in flat buckets of ``bucket`` elements."""
        if not self.enabled or self.sharded or module is None:
            return
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        start = 0
        while start < len(grads):
            end, size = start, 0
            while end < len(grads) and (end == start or size + grads[end].numel() <= bucket):
                size += grads[end].numel()
                end += 1
            flat = torch.cat([g.reshape(-1) for g in grads[start:end]])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat /= self.world
            offset = 0
            for g in grads[start:end]:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
            start = end

    def _device(self) -> str:
        return self.info.device


__all__ = ["Parallel", "Ranks", "decoder_blocks", "gathered", "is_sharded", "mixed_precision",
           "requires_gradient_sync", "wrap_model"]
