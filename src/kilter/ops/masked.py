"""Reductions over the real tokens of padded batches.

``mask`` is a bool or float tensor broadcastable to ``x`` with 1 (or a weight) on the
positions that count.  Positions where the mask is 0 never leak into a result, even when
they hold ``inf`` or ``nan`` (log-probs of padding often do).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Reduce = Callable[[torch.Tensor], torch.Tensor]
"""Sums a tensor over the processes of a data-parallel job (``torch.distributed.all_reduce``);
given to the batch statistics below, they are taken over every process's rows as one batch."""


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def _masked_values(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where rather than x * mask alone: 0 * inf is nan, and padding may hold inf.
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if mask.dtype == torch.bool:
        return torch.where(mask, x, zero)
    return torch.where(mask != 0, x * mask.to(x.dtype), zero)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over the masked-in positions.

    x: (B, T) (any shape); mask: broadcastable to x.  ``dim=None`` sums everything (0-dim result).
    """
    values = _masked_values(x, mask)
    return values.sum() if dim is None else values.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                reduce: Reduce | None = None) -> torch.Tensor:
    """Mean of ``x`` over the masked-in positions (weighted by the mask if it is float).

    x: (B, T); mask: broadcastable to x.  With ``dim=None`` the result is 0-dim; otherwise
    ``dim`` is reduced.  Where the mask is empty the mean is 0 (not nan), so an all-padding
    row contributes nothing instead of poisoning a batch statistic.  ``reduce`` (``dim=None``
    only): the sum and the count are summed over the processes first (:data:`Reduce`).
    """
    if reduce is not None and dim is not None:
        raise ValueError("masked_mean: reduce works on the whole-batch mean (dim=None) only")
    reduce = reduce or _local
    weights = torch.broadcast_to(mask, x.shape).to(x.dtype)
    total = reduce(masked_sum(x, mask, dim))
    count = reduce(weights.sum()) if dim is None else weights.sum(dim=dim)
    return total / count.clamp(min=torch.finfo(x.dtype).tiny)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               reduce: Reduce | None = None) -> torch.Tensor:
    """Variance of ``x`` over all masked-in positions (0-dim).

    x: (B, T); mask: (B, T).  ``unbiased`` applies Bessel's correction n / (n - 1) with n the
    number of masked-in positions; with n <= 1 the correction is undefined and the plain
    (biased) value, 0, is returned instead of inf/nan.  ``reduce``: over every process's
    positions (two passes, as in one process: the global mean, then the squared deviations).
    """
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_mean((x - mean) ** 2, mask, reduce=reduce)
    if unbiased:
        count = (reduce or _local)(torch.broadcast_to(mask, x.shape).to(x.dtype).sum())
        # torch.where instead of an `if` (no host sync on GPU); the inner where keeps the
        # unused branch finite so no nan leaks into the backward pass.
        several = count > 1
        var = var * torch.where(several, count / torch.where(several, count - 1, 1.0), 1.0)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8, reduce: Reduce | None = None
) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over the masked-in positions.

    x: (B, T); mask: (B, T) -> (B, T), 0 where the mask is 0.  Used for PPO advantages
    (the statistics are taken over the whole batch, not per row).  ``shift_mean=False``
    only rescales: the original mean is kept, which matters when the sign of the
    advantage should not be changed by normalisation.  ``reduce``: the statistics of every
    process's rows together (data-parallel PPO whitens over the whole global rollout).
    """
    mean = masked_mean(x, mask, reduce=reduce)
    var = masked_var(x, mask, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return _masked_values(whitened, mask != 0)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns] over the masked-in positions.

    values, returns, mask: (B, T).  1 means the value head predicts the returns exactly,
    0 means it is no better than a constant, negative means worse.  nan when the returns
    have no variance (the ratio is undefined).
    """
    values = values.detach().to(torch.float64)
    returns = returns.detach().to(torch.float64)
    var_returns = masked_var(returns, mask)
    if var_returns == 0:
        return float("nan")
    return float(1.0 - masked_var(returns - values, mask) / var_returns)
