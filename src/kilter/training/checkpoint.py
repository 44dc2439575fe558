"""A checkpoint: the model in Hugging Face format, the optimizer/scheduler/RNG state and the step.

Under ``parallel=fsdp`` the weights and optimizer state are sharded across the processes and a
checkpoint keeps them so (``torch.distributed.checkpoint``: every rank writes its own shards
into ``sharded/``, rank 0 the metadata), with ``config.json``, the tokenizer, the scheduler and
RNG state beside them; rank 0 seals the folder with the same manifest (sizes and sha256 of every
file, shards included) that a resume verifies.  A sharded checkpoint resumes on any number of
processes (DCP re-shards on load).  ``final/`` is always a plain Hugging Face folder: the full
weights are gathered on rank 0 and saved like an unsharded model's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from kilter.errors import KilterError
from kilter.models.saving import load_trainable_weights, save_model
from kilter.runs import RunDir
from kilter.training.parallel import is_sharded
from kilter.training.state import load_training_state, read_trainer_state, save_training_state, write_trainer_state

SHARDED = "sharded"
"""The folder of a checkpoint that holds the DCP shards of the model and optimizer."""


def save_checkpoint(run_dir: RunDir, step: int, model, tokenizer, optimizer, scheduler, keep: int | None,
                    trainer: str, extra: dict | None = None) -> None:
    """Write checkpoint ``step`` (every process calls this; rank 0 alone writes unless sharded).

    ``extra``: a trainer's own state beside the optimizer's (what :func:`resume_from` hands back)."""
    if is_sharded(model):
        _save_sharded(run_dir, step, model, tokenizer, optimizer, scheduler, keep, trainer, extra)
        return

    def write(path: Path) -> None:
        save_model(model, tokenizer, path, merge_lora=False)
        save_training_state(path, {"optimizer": optimizer, "scheduler": scheduler}, extra)
        write_trainer_state(path, {"step": step, "trainer": trainer})

    # before the first checkpoint, the room it needs is about the trainable weights and AdamW's two moments
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    run_dir.save_checkpoint(step, write, keep=keep, estimate=3 * trainable)


def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


ShardedModels = dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]]
"""The sharded models of a checkpoint and their optimizers, by name ("model" for a trainer's one model)."""


def _sharded_state(models: ShardedModels) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {}
    for name, (model, optimizer) in models.items():
        state[name] = get_model_state_dict(model)
        state["optimizer" if name == "model" else f"{name}_optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(run_dir: RunDir, step: int, models: ShardedModels, write_rest: Callable[[Path], None],
                 keep: int | None) -> None:
    """Checkpoint ``step`` of FSDP-sharded ``models`` (every process calls this): every rank writes its
    shards into ``sharded/``; rank 0 adds what ``write_rest(path)`` writes (config, tokenizer, scheduler,
    RNG, trainer_state.json with ``layout: sharded``) and seals the folder."""
    import torch.distributed.checkpoint as dcp

    state = _sharded_state(models)

    def write(path: Path) -> None:  # rank 0, inside the temporary folder RunDir swaps in at the end
        _broadcast(str(path))
        # DCP returns on rank 0 once every rank's shards and the metadata are written.
        dcp.save(state, checkpoint_id=path / SHARDED)
        write_rest(path)

    if run_dir.writer:
        run_dir.save_checkpoint(step, write, keep=keep)
    else:
        dcp.save(state, checkpoint_id=Path(_broadcast(None)) / SHARDED)
    dist.barrier()  # the sealed folder exists before any rank goes on (or resumes from it)


def load_sharded(checkpoint: Path, models: ShardedModels) -> None:
    """Restore what :func:`save_sharded` wrote into the (sharded) ``models`` and their optimizers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(models)
    dcp.load(state, checkpoint_id=Path(checkpoint) / SHARDED)
    for name, (model, optimizer) in models.items():
        set_model_state_dict(model, state[name])
        set_optimizer_state_dict(model, optimizer, state["optimizer" if name == "model" else f"{name}_optimizer"])


def sharded_layout(step: int, trainer: str, **extra) -> dict:
    """trainer_state.json of a sharded checkpoint."""
    return {"step": step, "trainer": trainer, "layout": SHARDED, "world_size": dist.get_world_size(), **extra}


def _save_sharded(run_dir: RunDir, step: int, model, tokenizer, optimizer, scheduler, keep, trainer: str,
                  extra: dict | None = None) -> None:
    def write_rest(path: Path) -> None:
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        save_training_state(path, {"scheduler": scheduler}, extra)
        write_trainer_state(path, sharded_layout(step, trainer))

    save_sharded(run_dir, step, {"model": (model, optimizer)}, write_rest, keep)


def check_layout(checkpoint: Path, sharded: bool) -> bool:
    """True when ``checkpoint`` is sharded; refuses (one line) a layout this run cannot read."""
    sharded_file = read_trainer_state(checkpoint).get("layout") == SHARDED
    if sharded_file != sharded:
        written, now = ("fsdp", "ddp") if sharded_file else ("ddp", "fsdp")
        raise KilterError(f"checkpoint {checkpoint} was written with parallel={written} (sharded checkpoints "
                          f"{'are' if sharded_file else 'are not'} read by parallel={written} only); "
                          f"resume with parallel={written} instead of parallel={now}")
    return sharded_file


def resume_from(checkpoint: Path, run_dir: RunDir, model, optimizer, scheduler, extra: dict | None = None) -> int:
    """Restore what :func:`save_checkpoint` wrote (weights, optimizer, scheduler, RNG; the trainer's own
    state into ``extra``); returns its step.

    Rows the interrupted run logged after that step are dropped from metrics.jsonl, so the
    resumed run's file reads like one uninterrupted run.
    """
    trainer_state = read_trainer_state(checkpoint)
    if check_layout(checkpoint, is_sharded(model)):
        load_sharded(checkpoint, {"model": (model, optimizer)})
        saved = load_training_state(checkpoint, {"scheduler": scheduler})
    else:
        load_trainable_weights(model, checkpoint)
        saved = load_training_state(checkpoint, {"optimizer": optimizer, "scheduler": scheduler})
    if extra is not None:
        extra.update(saved)
    step = int(trainer_state["step"])
    run_dir.truncate_metrics(step)
    return step


def full_state_dict(model) -> dict | None:
    """The whole model's weights as plain CPU tensors on rank 0 (None elsewhere); a collective
    under FSDP (every rank calls it), ``model.state_dict()`` otherwise."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if dist.get_rank() == 0 else None


def save_final(run_dir: RunDir, model, tokenizer, merge_lora: bool) -> None:
    """Write ``final/`` as a plain Hugging Face folder (every process calls this; rank 0 writes).

    A sharded model's weights are gathered on rank 0 first, so final/ loads with
    ``from_pretrained`` whatever ``parallel`` was.
    """
    plain = savable_model(model)
    run_dir.save_final(lambda p: save_model(plain, tokenizer, p, merge_lora=merge_lora))
    barrier_if_sharded(model)


def savable_model(model):
    """``model`` itself, or under FSDP an unsharded copy on rank 0 (None on the other ranks) for
    the ordinary saving code; a collective under FSDP (every rank calls it)."""
    if not is_sharded(model):
        return model
    state = full_state_dict(model)
    return plain_replica(model, state) if state is not None else None


def barrier_if_sharded(model) -> None:
    if is_sharded(model):
        dist.barrier()


def plain_replica(model, state: dict):
    """An unsharded copy of ``model`` (a Hugging Face model, PEFT-wrapped or not) holding ``state``.

    Built on the meta device and then given ``state``'s tensors (no second copy of the weights),
    so the ordinary saving code (LoRA merge included) writes it; it also runs (on the CPU).
    """
    from torch.distributed.fsdp import FSDPModule

    from kilter.models.lora import is_peft

    base = model.get_base_model() if is_peft(model) else model
    cls = next(c for c in type(base).__mro__ if not issubclass(c, FSDPModule))  # fully_shard swaps the class
    with torch.device("meta"):
        replica = cls._from_config(base.config, dtype=next(iter(state.values())).dtype)
        if is_peft(model):
            from peft import get_peft_model

            replica = get_peft_model(replica, model.peft_config[model.active_adapter])
    _add_missing_biases(replica, state)
    replica.load_state_dict(state, strict=True, assign=True)
    # Buffers outside the state dict (rotary frequencies) are not sharded: copied from the model.
    buffers = dict(model.named_buffers())
    for name, buf in list(replica.named_buffers()):
        if buf.is_meta and name in buffers:
            owner, _, leaf = name.rpartition(".")
            module = replica.get_submodule(owner) if owner else replica
            module.register_buffer(leaf, buffers[name].detach().clone().cpu(),
                                   persistent=leaf not in module._non_persistent_buffers_set)
    if hasattr(replica, "tie_weights"):
        replica.tie_weights()
    return replica


def _add_missing_biases(replica, state: dict) -> None:
    """Give a Linear of the replica the bias the trained model has (a PPO critic's head gains one,
    :func:`kilter.models.reward.build_value_model`), so the config-built replica matches its state."""
    own = set(replica.state_dict())
    for key in state:
        owner, _, leaf = key.rpartition(".")
        if key in own or leaf != "bias" or f"{owner}.weight" not in own:
            continue
        module = replica.get_submodule(owner)
        if isinstance(module, torch.nn.Linear) and module.bias is None:
            parent, _, name = owner.rpartition(".")
            with torch.device("meta"):
                head = torch.nn.Linear(module.in_features, module.out_features, bias=True,
                                       dtype=module.weight.dtype)
            setattr(replica.get_submodule(parent) if parent else replica, name, head)
