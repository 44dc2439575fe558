"""Context distillation: token-level KL between a teacher that sees a context and a student that does not.

Context distillation (Askell et al. 2021, "A General Language Assistant as a Laboratory for
Alignment", sec. 3.4; used to initialise RLHF in Bai et al. 2022) trains a model without a
prompt to behave as the same model does *with* the prompt: the teacher is p(. | context, x, y_<t),
the student q(. | x, y_<t), and the loss is their KL at every token of continuations y.  It is
knowledge distillation on soft targets (Hinton et al. 2015) where teacher and student differ
only in what they are shown.

Two directions, per token (sums over the vocabulary V, or over the teacher's top k tokens):

* ``forward``  KL(p || q) = sum_v p(v) (log p(v) - log q(v)) -- the paper's choice: the
  student covers every token the teacher likes (mass-covering).  Its gradient with respect to the
  student's logits z is q - p, i.e. cross-entropy to the teacher's soft labels.
* ``reverse``  KL(q || p) = sum_v q(v) (log q(v) - log p(v)) -- mode-seeking: the student may drop
  tokens the teacher gives little mass to.  Gradient with respect to z_v: q_v (d_v - KL(q || p)),
  with d_v = log q_v - log p_v.

**Top-k truncation.**  Storing p over a 50k vocabulary for every training token costs N x V floats;
:func:`teacher_topk` keeps only the teacher's k most likely tokens and renormalises them,
p~(v) = p(v) / sum_{u in top-k} p(u).  The student is then renormalised over the *same* k tokens,
q~(v) = q(v) / sum_{u in top-k} q(u), and the KL (either direction) is that between p~ and q~ over k
outcomes.  Both directions stay finite (a lumped "rest" bucket would give the teacher probability 0
there and make the reverse KL infinite), an identical student still gives exactly 0, and k = V is the
exact KL.  What it gives up: the student's mass outside the teacher's top k gets no gradient from
this loss (it is neither pushed down nor up); choose k so that the top k hold nearly all of the
teacher's mass (``kilter distill`` logs that share as ``teacher/topk_mass``).
"""

from __future__ import annotations

from typing import Literal

import torch

from kilter.errors import ConfigError

KLDirection = Literal["forward", "reverse"]

__all__ = ["KLDirection", "teacher_topk", "distill_kl", "token_kls"]


def teacher_topk(teacher_logits: torch.Tensor, k: int | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The teacher's next-token distribution, truncated to its k most likely tokens and renormalised.

    teacher_logits: (N, V) logits at N positions -> (logps (N, k), index (N, k) long, kept mass (N,)),
    logps = log p~ over the kept tokens (logsumexp 0 per row), kept mass = sum of p over them before
    renormalising.  ``k`` None (or >= V): the full distribution, logps (N, V), index None, mass 1.
    Computed in fp32 (fp64 stays fp64); no gradient is meant to flow (the teacher is frozen).
    """
    if k is not None and k < 1:
        raise ConfigError(f"top_k must be >= 1 or null (the full distribution), got {k}")
    logps = torch.log_softmax(teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32)), dim=-1)
    if k is None or k >= logps.shape[-1]:
        return logps, None, torch.ones(logps.shape[:-1], dtype=logps.dtype, device=logps.device)
    top, index = logps.topk(k, dim=-1)
    mass = top.logsumexp(-1)
    return top - mass.unsqueeze(-1), index, mass.exp()


def token_kls(student_logits: torch.Tensor, teacher_logps: torch.Tensor, teacher_index: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(p || q), KL(q || p)) per position, (N,) each, differentiable in the student's logits.

    student_logits: (N, V); teacher_logps: (N, V) log p, or (N, k) log p~ over the tokens
    ``teacher_index`` (N, k) (see the module docstring: the student is renormalised over those k).
    The teacher's values are renormalised again here, so a cache stored in lower precision stays a
    distribution.
    """
    if teacher_index is None and teacher_logps.shape != student_logits.shape:
        raise ValueError(f"teacher log-probs {tuple(teacher_logps.shape)} do not match the student's logits "
                         f"{tuple(student_logits.shape)}; pass teacher_index for top-k values")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    q = torch.log_softmax(student_logits.to(dtype), dim=-1)
    if teacher_index is not None:
        q = q.gather(-1, teacher_index.long())
        q = q - q.logsumexp(-1, keepdim=True)
    p = teacher_logps.to(dtype)
    p = p - p.logsumexp(-1, keepdim=True)
    diff = p - q
    forward = (p.exp() * diff).sum(-1)
    reverse = (q.exp() * -diff).sum(-1)
    return forward, reverse


def distill_kl(student_logits: torch.Tensor, teacher_logps: torch.Tensor, teacher_index: torch.Tensor | None = None,
               direction: KLDirection = "forward") -> torch.Tensor:
    """Per-position distillation loss (N,): KL(p || q) for ``forward``, KL(q || p) for ``reverse``.

    Shapes as :func:`token_kls`.  The trainer sums it over every continuation token of an optimizer
    step and divides by their number (the per-token mean, as ``kilter sft``'s cross-entropy).
    """
    if direction not in ("forward", "reverse"):
        raise ConfigError(f"kl must be 'forward' or 'reverse', got {direction!r}")
    forward, reverse = token_kls(student_logits, teacher_logps, teacher_index)
    return forward if direction == "forward" else reverse
