"""A distillation teacher's next-token distributions: computed at the continuation tokens, cached once.

``kilter distill`` compares, at every continuation token, the teacher's distribution (the model
shown a context) with the student's.  The teacher is frozen, so its (top-k truncated) distributions
can be computed in one pass before training and stored in the run directory
(``teacher_topk.pt``), as DPO stores its reference log-probs: keyed by a hash of the token ids, the
teacher weights, k and the precision, so a resumed run reuses them and a changed data set or
teacher never reuses stale numbers.  The teacher is a :class:`kilter.models.reference.Reference`:
a separate frozen model, or the LoRA student with its adapter disabled (no second copy).

Layout of the precomputed tensors for N examples holding T_i continuation tokens each: rows
``offsets[i]:offsets[i + 1]`` of ``logps`` (sum T_i, k) and ``index`` (sum T_i, k) belong to
example i, in token order -- the order in which :func:`completion_logits` returns a padded batch's
positions.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from kilter.data.collate import pad_batch
from kilter.distributed import DistInfo, all_reduce_sum
from kilter.losses.distill import teacher_topk
from kilter.models.precision import autocast
from kilter.models.reference import Reference, examples_fingerprint
from kilter.ops.tokens import IGNORE_INDEX
from kilter.runs import atomic_write_file

__all__ = ["TEACHER_CACHE", "completion_select", "completion_logits", "precompute_teacher_topk",
           "cached_teacher_topk", "gather_rows"]

TEACHER_CACHE = "teacher_topk.pt"


def completion_select(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T - 1) bool: the positions whose logits predict a labelled (continuation) token."""
    return batch["labels"][:, 1:] != IGNORE_INDEX


def completion_logits(model, batch: dict[str, torch.Tensor], precision: str, device: str | torch.device,
                      loss_model=None) -> torch.Tensor:
    """(N, V) logits at the N positions of :func:`completion_select`, row by row, in token order.

    ``loss_model`` is a :class:`kilter.models.packed.CompletionLogits` of ``model`` (the LM head then
    runs only at those positions); without it the whole (B, T, V) logits are computed and indexed.
    Position ids come from the attention mask, as in :func:`kilter.models.logprobs.per_token_logps`.
    """
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device).long()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    select = completion_select(batch).to(device)
    with autocast(precision, str(device)):
        if loss_model is not None:
            return loss_model(ids, mask, positions, select)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        return logits[:, :-1][select]


def gather_rows(table: dict, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logps, index or None, kept mass) rows of the examples ``indices`` from a precomputed table, in that order."""
    offsets = table["offsets"]
    rows = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in indices])
    index = table["index"]
    return table["logps"][rows], (None if index is None else index[rows].long()), table["mass"][rows]


@torch.no_grad()
def precompute_teacher_topk(teacher: Reference, examples: Sequence[dict], pad_id: int, batch_size: int,
                            top_k: int | None, precision: str, device: str | torch.device,
                            info: DistInfo | None = None) -> dict:
    """The teacher's top-k log-probs at every continuation token of ``examples`` (teacher views:
    context + prompt + continuation, labels -100 before the continuation).

    Returns ``{"logps": (sum T_i, k) fp32, "index": (sum T_i, k) int32 or None (k null: the whole
    vocabulary), "offsets": (N + 1,) long, "mass": (sum T_i,) teacher mass kept by the top k}`` on
    the CPU.  Under data parallelism each rank computes every ``world_size``-th example and the
    tables are summed across ranks (each entry is written by exactly one rank).
    """
    info = info or DistInfo()
    counts = [sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for ex in examples]
    offsets = torch.zeros(len(examples) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    total = int(offsets[-1])
    logps = index = mass = None
    mine = list(range(info.rank, len(examples), info.world_size))
    mine.sort(key=lambda i: len(examples[i]["input_ids"]))
    with teacher.frozen() as model:
        for start in range(0, len(mine), batch_size):
            idx = mine[start:start + batch_size]
            batch = pad_batch([examples[i] for i in idx], pad_id, keys=("input_ids", "labels"))
            values, top, kept = teacher_topk(completion_logits(model, batch, precision, device), top_k)
            if logps is None:
                width = values.shape[-1]
                logps = torch.zeros(total, width, dtype=torch.float64)
                index = None if top is None else torch.zeros(total, width, dtype=torch.float64)
                mass = torch.zeros(total, dtype=torch.float64)
            rows = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in idx])
            logps[rows] = values.double().cpu()
            mass[rows] = kept.double().cpu()
            if top is not None:
                index[rows] = top.double().cpu()  # exact: token ids are far below 2**53
    if logps is None:  # this rank had no examples (more ranks than examples): same shapes as the others
        vocab = model_vocab(teacher)
        full = top_k is None or top_k >= vocab
        width = vocab if full else top_k
        logps, mass = torch.zeros(total, width, dtype=torch.float64), torch.zeros(total, dtype=torch.float64)
        index = None if full else torch.zeros(total, width, dtype=torch.float64)

    def reduce(t: torch.Tensor) -> torch.Tensor:
        # NCCL reduces only device tensors; gloo (CPU) takes them where they are.
        return all_reduce_sum(t.to(device) if info.enabled else t, info).cpu()

    logps, mass = reduce(logps).float(), reduce(mass).float()
    if index is not None:
        index = reduce(index).round().to(torch.int32)
    return {"logps": logps, "index": index, "offsets": offsets, "mass": mass}


def model_vocab(teacher: Reference) -> int:
    with teacher.frozen() as model:
        return int(model.get_output_embeddings().weight.shape[0])


def _load(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        blob = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):  # a damaged cache is recomputed
        return {}
    return blob if isinstance(blob, dict) else {}


def cached_teacher_topk(run_dir: str | Path, name: str, teacher: Reference, examples: Sequence[dict], pad_id: int,
                        batch_size: int, top_k: int | None, precision: str, device: str | torch.device,
                        info: DistInfo | None = None) -> tuple[dict, bool]:
    """:func:`precompute_teacher_topk`, from ``run_dir/teacher_topk.pt`` when its key matches.

    The key hashes the teacher views' tokens, the teacher weights, ``top_k`` and ``precision``;
    ``name`` ("train", ...) separates several sets in one file.  Returns (table, True if it came from
    the cache).  Only the main process writes the file.
    """
    info = info or DistInfo()
    path = Path(run_dir) / TEACHER_CACHE
    key = examples_fingerprint(examples, f"{teacher.fingerprint()}|{precision}|top_k={top_k}")
    entry = _load(path).get(name)
    if isinstance(entry, dict) and entry.get("key") == key and len(entry.get("offsets", ())) == len(examples) + 1:
        return {k: entry[k] for k in ("logps", "index", "offsets", "mass")}, True
    table = precompute_teacher_topk(teacher, examples, pad_id, batch_size, top_k, precision, device, info)
    if info.is_main:
        blob = _load(path)
        blob[name] = {"key": key, **table}
        atomic_write_file(path, lambda tmp: torch.save(blob, tmp))
    return table, False
