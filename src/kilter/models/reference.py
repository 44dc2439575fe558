"""Log-probabilities of responses under the policy and under a frozen reference model.

DPO, KTO and PPO all compare the policy pi_theta with a frozen reference pi_ref (the model
training started from).  This module holds the shared pieces:

* :func:`per_token_logps` / :func:`sequence_logps` -- log pi(y_t | x, y_<t) per response
  token, and their sum over a response, from one forward pass;
* :class:`Reference` -- the frozen model.  With LoRA it is the policy itself with the
  adapter switched off (``peft``'s ``disable_adapter()``), so no second copy of the weights
  is held; otherwise a separate frozen copy (or another model given by the user);
* :func:`cached_sequence_logps` -- the reference log-probs of a whole data set computed in
  one pass and stored in the run directory (``ref_logps.pt``) under a key that hashes the
  token ids and the reference weights, so a resumed run reuses them and a changed data set
  or model never silently reuses stale numbers.  Once everything is precomputed the
  reference model can be freed, which halves the memory of full fine-tuning.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from kilter.data.collate import pad_batch
from kilter.distributed import DistInfo, all_reduce_sum
from kilter.models.logprobs import packed_sequence_logps, per_token_logps, sequence_logps
from kilter.models.lora import is_peft
from kilter.models.packed import fast_causal_lm
from kilter.runs import atomic_write_file

__all__ = [
    "per_token_logps",
    "sequence_logps",
    "Reference",
    "model_fingerprint",
    "examples_fingerprint",
    "precompute_sequence_logps",
    "cached_sequence_logps",
    "CACHE_FILE",
]

CACHE_FILE = "ref_logps.pt"


# --------------------------------------------------------------------------- the reference model


class Reference:
    """The frozen reference pi_ref.

    ``Reference(policy)`` with a peft (LoRA) policy uses the policy with its adapter
    disabled; with a plain policy it deep-copies the current weights, so build it *before*
    the first optimizer step.  ``Reference(policy, model=other)`` uses ``other``.
    Log-probs are always computed in eval mode and without gradients.
    """

    def __init__(self, policy, model=None):
        self.policy = policy
        if model is None and is_peft(policy):
            self.model = None  # the adapter-disabled policy
        else:
            self.model = model if model is not None else copy.deepcopy(policy)
            self.model.requires_grad_(False)
            self.model.eval()
        self._fingerprint: str | None = None
        self._fast = None  # CompletionLogits of the reference model, once enable_packing() succeeded

    def enable_packing(self, device: str | torch.device) -> bool:
        """Use padding-free rows and completion-only logits in :meth:`packed_sequence_logps`
        when the reference model passes :func:`kilter.models.packed.fast_causal_lm`'s check."""
        wrapper, ok = fast_causal_lm(self.model if self.model is not None else self.policy, str(device))
        self._fast = wrapper if ok else None
        return self._fast is not None

    @property
    def shares_policy(self) -> bool:
        """True when the reference is the adapter-disabled policy (no extra weights held)."""
        return self.model is None

    @contextlib.contextmanager
    def _as_model(self) -> Iterator[torch.nn.Module]:
        if self.model is not None:
            yield self.model
            return
        was_training = self.policy.training
        self.policy.eval()  # no adapter dropout in the reference
        try:
            with self.policy.disable_adapter():
                yield self.policy
        finally:
            if was_training:
                self.policy.train()

    def frozen(self) -> contextlib.AbstractContextManager[torch.nn.Module]:
        """The reference as a module, in eval mode, for callers that need more than log-probs of given
        tokens (a distillation teacher's whole next-token distributions, sampling from it): the
        separate copy, or the policy with its adapter disabled for the duration of the block."""
        return self._as_model()

    @torch.no_grad()
    def sequence_logps(self, batch: dict[str, torch.Tensor], precision: str, device: str | torch.device,
                       average: bool = False) -> torch.Tensor:
        """(N,) summed (or mean) response log-probs under the reference; see :func:`sequence_logps`."""
        with self._as_model() as model:
            return sequence_logps(model, batch, precision, device, average=average)

    @torch.no_grad()
    def packed_sequence_logps(self, examples: Sequence[dict], pad_id: int, capacity: int, precision: str,
                              device: str | torch.device, average: bool = False, group_size: int = 1) -> torch.Tensor:
        """(N,) reference log-probs of tokenized examples through packed rows (see :meth:`enable_packing`)."""
        if self._fast is None:
            raise RuntimeError("enable_packing() did not succeed for this reference")
        with self._as_model():
            return packed_sequence_logps(self._fast, list(examples), pad_id, capacity, precision, device, average,
                                         group_size)

    @torch.no_grad()
    def per_token_logps(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
        """(B, T - 1) per-token log-probs under the reference; see :func:`per_token_logps`."""
        with self._as_model() as model:
            return per_token_logps(model, input_ids, attention_mask, response_mask, temperature)

    def fingerprint(self) -> str:
        """Hash of the reference weights (the base weights when it is the adapter-disabled policy)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model if self.model is not None else self.policy)
        return self._fingerprint

    def release(self) -> None:
        """Drop a separate reference copy (after precomputing, it is no longer needed)."""
        if self.model is not None:
            self.model = None
            self.policy = None
            self._fast = None


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and bytes, skipping LoRA adapter weights.

    Two models hash equal exactly when their (non-adapter) weights are bitwise equal.
    """
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        # peft renames base weights (base_model.model.x.base_layer.weight); strip that so a
        # LoRA-wrapped model and the plain model it wraps hash the same.
        clean = name.replace("base_model.model.", "").replace(".base_layer", "")
        data = param.detach().to("cpu").contiguous()
        digest.update(f"{clean}:{tuple(data.shape)}:{data.dtype}".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def examples_fingerprint(examples: Sequence[dict], extra: str = "") -> str:
    """sha256 of the token ids and response masks of ``examples`` (plus any ``extra`` text)."""
    digest = hashlib.sha256(extra.encode())
    for ex in examples:
        digest.update(json.dumps([ex["input_ids"], ex["labels"]], separators=(",", ":")).encode())
        digest.update(b";")
    return digest.hexdigest()


# --------------------------------------------------------------------------- precompute and cache


@torch.no_grad()
def precompute_sequence_logps(reference: Reference, examples: Sequence[dict], pad_id: int, batch_size: int,
                              precision: str, device: str | torch.device, info: DistInfo | None = None,
                              average: bool = False) -> torch.Tensor:
    """Reference log-probs of every example in one pass: (N,) fp32 on the CPU.

    ``examples`` are tokenized examples (``input_ids``, ``labels``).  Under data
    parallelism each rank computes every ``world_size``-th example and the results are
    summed across ranks, so all ranks end with the full tensor.  Examples are batched in
    order of length to cut padding.
    """
    info = info or DistInfo()
    out = torch.zeros(len(examples), dtype=torch.float64)
    mine = list(range(info.rank, len(examples), info.world_size))
    mine.sort(key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        batch = pad_batch([examples[i] for i in idx], pad_id, keys=("input_ids", "labels"))
        values = reference.sequence_logps(batch, precision, device, average=average)
        out[torch.tensor(idx)] = values.double().cpu()
    # NCCL reduces only device tensors; gloo (CPU) takes them where they are.
    return all_reduce_sum(out.to(device) if info.enabled else out, info).float().cpu()


def _load_cache(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        blob = torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 - a damaged cache is recomputed, never trusted
        return {}
    return blob if isinstance(blob, dict) else {}


def _save_cache(path: Path, blob: dict) -> None:
    atomic_write_file(path, lambda tmp: torch.save(blob, tmp))


def cached_sequence_logps(run_dir: str | Path, name: str, reference: Reference, examples: Sequence[dict],
                          pad_id: int, batch_size: int, precision: str, device: str | torch.device,
                          info: DistInfo | None = None, average: bool = False) -> tuple[torch.Tensor, bool]:
    """Reference log-probs of ``examples``, from ``run_dir/ref_logps.pt`` when its key matches.

    The key hashes the examples' tokens, the reference weights, ``precision`` and
    ``average``; ``name`` ("train", "eval", ...) separates several sets in one file.
    Returns ((N,) fp32 log-probs, True if they came from the cache).  Only the main
    process writes the file.
    """
    info = info or DistInfo()
    path = Path(run_dir) / CACHE_FILE
    key = examples_fingerprint(examples, f"{reference.fingerprint()}|{precision}|average={average}")
    blob = _load_cache(path)
    entry = blob.get(name)
    if isinstance(entry, dict) and entry.get("key") == key and len(entry.get("logps", ())) == len(examples):
        return entry["logps"].float(), True
    logps = precompute_sequence_logps(reference, examples, pad_id, batch_size, precision, device, info, average)
    if info.is_main:
        blob = _load_cache(path)
        blob[name] = {"key": key, "logps": logps}
        path.parent.mkdir(parents=True, exist_ok=True)
        _save_cache(path, blob)
    return logps, False
