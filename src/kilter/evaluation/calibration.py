"""Calibration of a preference model: does P(chosen wins) = 0.7 come true 70% of the time?"""

from __future__ import annotations

import torch


def calibration_sums(p_chosen: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-bin (count, sum of predictions, sum of outcomes) of predicted P(chosen wins).

    p_chosen: (P,) the model's sigmoid(r_chosen - r_rejected) -> (3, n_bins) float64.
    Each pair enters twice, as (p, won=1) and as (1 - p, won=0), so the table covers [0, 1]
    symmetrically and does not depend on which response of a pair is named first.  Bins are
    [i/n, (i+1)/n), the last one closed.  Sums (not means) so ranks can all-reduce them.
    """
    p = p_chosen.detach().double().flatten()
    preds = torch.cat([p, 1.0 - p])
    outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])
    index = (preds * n_bins).long().clamp(0, n_bins - 1)
    out = torch.zeros(3, n_bins, dtype=torch.float64)
    out[0].index_add_(0, index, torch.ones_like(preds))
    out[1].index_add_(0, index, preds)
    out[2].index_add_(0, index, outcome)
    return out


def calibration_report(sums: torch.Tensor) -> dict:
    """Reliability table and expected calibration error from :func:`calibration_sums`.

    ECE = sum over bins of (n_b / n) * |mean prediction_b - observed frequency_b|
    (Naeini et al. 2015; Guo et al. 2017).  Empty bins are listed with nulls.
    """
    count, pred, obs = sums[0], sums[1], sums[2]
    n_bins, total = count.shape[0], float(count.sum())
    bins, ece = [], 0.0
    for i in range(n_bins):
        n = float(count[i])
        mean_pred = float(pred[i]) / n if n else None
        observed = float(obs[i]) / n if n else None
        if n:
            ece += n / total * abs(mean_pred - observed)
        bins.append({"lo": i / n_bins, "hi": (i + 1) / n_bins, "count": int(n), "mean_predicted": mean_pred,
                     "observed": observed})
    return {"n_pairs": int(total // 2), "ece": ece, "bins": bins}
