"""Reward over-optimisation: the functional forms of Gao, Schulman & Hilton 2022 and a divergence check.

"Scaling Laws for Reward Model Overoptimization" (arXiv:2210.10760) measures the gold reward
gained over the starting policy as a function of ``d = sqrt(KL(pi || pi_0))`` and finds

* best-of-n (their eq. 1):  ``R_bon(d) = d * (alpha - beta * d)``
* RL        (their eq. 2):  ``R_RL(d)  = d * (alpha - beta * log d)``

Both are linear in ``(alpha, beta)``, so ordinary least squares without an intercept recovers
them exactly from noise-free points.  The proxy (reward-model) score keeps rising while the gold
score peaks: at ``d* = alpha / (2 beta)`` for best-of-n and ``d* = exp(alpha / beta - 1)`` for RL
(where the derivative ``alpha - beta (log d + 1)`` is zero).

All functions are pure: lists of floats in, floats out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["GaoFit", "fit_gao", "gao_curve", "divergence", "OveroptimisationMonitor"]

Form = Literal["bon", "rl"]


@dataclass(frozen=True)
class GaoFit:
    form: Form
    alpha: float
    beta: float
    r2: float
    """Coefficient of determination of the fit on the points given (1 = exact)."""

    @property
    def peak_d(self) -> float | None:
        """sqrt(KL) at which the fitted gold gain is largest (None when the curve never turns: beta <= 0)."""
        if self.beta <= 0:
            return None
        if self.form == "bon":
            return self.alpha / (2 * self.beta)
        return math.exp(self.alpha / self.beta - 1)

    @property
    def peak_gain(self) -> float | None:
        d = self.peak_d
        return None if d is None else gao_curve(self.form, self.alpha, self.beta, [d])[0]


def _basis(form: Form, d: float) -> tuple[float, float]:
    """The two regressors multiplying alpha and -beta."""
    if form == "bon":
        return d, d * d
    if d <= 0:
        return 0.0, 0.0  # d log d -> 0 as d -> 0
    return d, d * math.log(d)


def gao_curve(form: Form, alpha: float, beta: float, d: Sequence[float]) -> list[float]:
    """The gold gain predicted at each sqrt(KL) in ``d``: (N,) -> (N,)."""
    return [alpha * a - beta * b for a, b in (_basis(form, x) for x in d)]


def fit_gao(form: Form, d: Sequence[float], gain: Sequence[float]) -> GaoFit:
    """Least-squares (alpha, beta) of ``gain ~ d (alpha - beta f(d))`` with f(d) = d (bon) or log d (rl).

    ``d``: (N,) sqrt(KL) values >= 0; ``gain``: (N,) gold (or proxy) reward minus the starting
    policy's. Solves the 2x2 normal equations; raises ValueError with fewer than two usable
    points or a singular system (e.g. every d equal).
    """
    if form not in ("bon", "rl"):
        raise ValueError(f"form must be 'bon' or 'rl', got {form!r}")
    if len(d) != len(gain):
        raise ValueError(f"fit_gao got {len(d)} d values but {len(gain)} gains")
    points = [(x, y) for x, y in zip(d, gain) if math.isfinite(x) and math.isfinite(y) and x >= 0]
    if len(points) < 2:
        raise ValueError("fit_gao needs at least two finite points with d >= 0")
    s_aa = s_ab = s_bb = s_ay = s_by = 0.0
    for x, y in points:
        a, b = _basis(form, x)
        s_aa += a * a
        s_ab += a * b
        s_bb += b * b
        s_ay += a * y
        s_by += b * y
    det = s_aa * s_bb - s_ab * s_ab
    if abs(det) <= 1e-12 * max(1.0, s_aa * s_bb):
        raise ValueError("fit_gao: the points do not pin down two parameters (need two distinct d > 0)")
    # gain = alpha * a + c * b with c = -beta
    alpha = (s_ay * s_bb - s_by * s_ab) / det
    c = (s_aa * s_by - s_ab * s_ay) / det
    beta = -c
    ys = [y for _, y in points]
    mean = sum(ys) / len(ys)
    pred = gao_curve(form, alpha, beta, [x for x, _ in points])
    ss_res = sum((y - p) ** 2 for y, p in zip(ys, pred))
    ss_tot = sum((y - mean) ** 2 for y in ys)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)
    return GaoFit(form, alpha, beta, r2)


def divergence(proxy: Sequence[float], truth: Sequence[float], window: int = 3, tolerance: float = 0.0) -> bool:
    """True when, over the last ``window`` points, the proxy rose while the truth (gold or held-out
    agreement) fell: the signature of over-optimisation (Gao et al. 2022, fig. 1).

    Compares the last point with the one ``window - 1`` steps earlier; ``tolerance`` is how much
    the truth may drop before it counts. Fewer than ``window`` points: False.
    """
    if window < 2:
        raise ValueError("window must be at least 2")
    if len(proxy) != len(truth):
        raise ValueError(f"divergence got {len(proxy)} proxy values but {len(truth)} truth values")
    if len(proxy) < window:
        return False
    first, last = len(proxy) - window, len(proxy) - 1
    return proxy[last] > proxy[first] and truth[last] < truth[first] - tolerance


class OveroptimisationMonitor:
    """Watches a run's evaluations for over-optimisation and says when to stop.

    Each :meth:`update` takes one evaluation's proxy reward and truth (gold, or the reward model's
    held-out agreement). An evaluation *diverges* when the proxy rose since the previous one while
    the truth fell; ``patience`` diverging evaluations in a row trigger the stop, so one noisy
    evaluation does not end a run. Worked: proxy 1, 2, 3 and truth 0.5, 0.4, 0.3 with patience 2
    -> False, False, True.
    """

    def __init__(self, patience: int = 2):
        if patience < 1:
            raise ValueError("patience must be at least 1")
        self.patience = patience
        self.streak = 0
        self._last: tuple[float, float] | None = None

    def update(self, proxy: float, truth: float) -> bool:
        """Record one evaluation; True when the last ``patience`` of them all diverged."""
        if self._last is not None:
            diverged = proxy > self._last[0] and truth < self._last[1]
            self.streak = self.streak + 1 if diverged else 0
        self._last = (proxy, truth)
        return self.streak >= self.patience
