"""Log-probabilities of responses under a causal LM: the one implementation trainers, eval and rollout use.

Every path reduces to :func:`kilter.ops.logprobs.selective_log_softmax` over the logits that
predict the response tokens; what differs is only how the rows are laid out:

- :func:`per_token_logps` / :func:`sequence_logps`: padded rows (``input_ids``, ``attention_mask``,
  a response mask or ``labels``); per-token values or per-response sums/means.  DPO, KTO, the
  reference model's cache, distillation's evaluation.
- :func:`packed_sequence_logps`: the same sums on padding-free packed rows with logits only at
  response positions (optionally one shared copy of a group's prompt).  DPO and KTO's fast path.
- :func:`kilter.rollout.scoring.token_logprobs` builds on the same pieces for a rollout's
  layout (left-padded prompts, PAD excluded from the softmax); it lives with the rollout batch.

Each fast layout is checked once per model against the padded computation (kilter.fastpaths).
"""

from __future__ import annotations

import torch

from kilter.models import shared_prefix
from kilter.models.packed import pack_micro_batch
from kilter.models.precision import autocast
from kilter.ops.logprobs import selective_log_softmax
from kilter.ops.tokens import IGNORE_INDEX


def per_token_logps(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for every response token, 0 elsewhere.

    input_ids, attention_mask, response_mask: (B, T); response_mask is 1 on the tokens whose
    log-prob is wanted (the response and its EOS), 0 on the prompt and padding.
    Returns (B, T - 1) in fp32, aligned with ``input_ids[:, 1:]``: entry t holds the
    log-prob of token t + 1, given everything before it.

    Position ids are derived from the attention mask, so left-padded rows (as produced by
    generation) get the same positions as unpadded ones.  ``temperature`` divides the
    logits, as when sampling.  Differentiable with respect to the model's parameters.
    """
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    logps = selective_log_softmax(logits[:, :-1], input_ids[:, 1:], temperature=temperature).float()
    return torch.where(response_mask[:, 1:].bool(), logps, torch.zeros((), dtype=logps.dtype, device=logps.device))


def sequence_logps(model, batch: dict[str, torch.Tensor], precision: str, device: str | torch.device,
                   average: bool = False) -> torch.Tensor:
    """Summed log-prob of each row's response: (N,) fp32 (the mean per token if ``average``).

    ``batch`` is a padded batch from :func:`kilter.data.collate.pad_batch`: ``input_ids``,
    ``attention_mask`` and either ``response_mask`` or ``labels`` (-100 on prompt and
    padding).  The forward pass runs under the given precision (``fp32`` or ``bf16``
    autocast).  Gradients flow unless the caller disables them.
    """
    ids = batch["input_ids"].to(device)
    mask = batch["attention_mask"].to(device)
    if "response_mask" in batch:
        response = batch["response_mask"].to(device).bool()
    else:
        response = batch["labels"].to(device) != IGNORE_INDEX
    with autocast(precision, str(device)):
        per_token = per_token_logps(model, ids, mask, response)
    total = per_token.sum(-1)
    if average:
        total = total / response[:, 1:].sum(-1).clamp(min=1)
    return total


def packed_sequence_logps(loss_model, examples: list[dict], pad_id: int, capacity: int, precision: str,
                          device, average: bool = False, group_size: int = 1) -> torch.Tensor:
    """Summed (or per-token mean) response log-probs of tokenized examples: (N,) fp32.

    The padding-free twin of :func:`sequence_logps`: ``examples``
    (``input_ids``, ``labels`` with -100 on the prompt) are packed by :func:`pack_micro_batch`,
    ``loss_model`` is a :class:`CompletionLogits` (or a DDP wrapper of one), and the LM head
    runs only on response positions.  With ``group_size`` k > 1 every k consecutive examples
    share a prompt and, when the model passed the check, are laid out with one copy of their
    common prefix (:mod:`kilter.models.shared_prefix`).  Differentiable unless the caller
    disables gradients.
    """
    inner = getattr(loss_model, "module", loss_model)  # DistributedDataParallel
    with autocast(precision, str(device)):
        if group_size > 1 and getattr(inner, "shares_prefix", False):
            groups = [[list(ex["input_ids"]) for ex in examples[i:i + group_size]]
                      for i in range(0, len(examples), group_size)]
            sp = shared_prefix.pack_groups(groups, pad_id, capacity, inner.attention_weight).to(device)
            seq, pos, target = [], [], []
            for s, ex in enumerate(examples):
                for t, label in enumerate(ex["labels"]):
                    if t > 0 and label != IGNORE_INDEX:
                        seq.append(s)
                        pos.append(t)
                        target.append(ex["input_ids"][t])
            owner = torch.tensor(seq, dtype=torch.long, device=device)
            index = shared_prefix.predicting_index(sp, owner, torch.tensor(pos, dtype=torch.long, device=device))
            logits = loss_model(sp.input_ids, sp.attention_mask, sp.position_ids, index=index)
            targets = torch.tensor(target, dtype=torch.long, device=device)
        else:
            batch = pack_micro_batch(examples, pad_id, capacity,
                                     attention_weight=getattr(inner, "attention_weight", 0.0))
            labels = batch["labels"][:, 1:].to(device)
            select = labels != IGNORE_INDEX
            logits = loss_model(batch["input_ids"].to(device), None, batch["position_ids"].to(device), select)
            targets = labels[select]
            owner = batch["example_index"][:, 1:].to(device)[select]
    logps = selective_log_softmax(logits, targets).float()
    total = torch.zeros(len(examples), dtype=logps.dtype, device=logps.device).index_add(0, owner, logps)
    if average:
        total = total / torch.bincount(owner, minlength=len(examples)).clamp(min=1).to(total.dtype)
    return total
