"""Gao et al. 2022 fits recover the parameters of synthetic curves; the peak sits where the derivative is 0."""

import math
import random

import pytest

from kilter.evaluation.overoptimization import divergence, fit_gao, gao_curve


@pytest.mark.parametrize("form,alpha,beta", [("bon", 1.2, 0.3), ("rl", 0.8, 0.25), ("rl", 2.0, 0.9)])
def test_exact_points_give_back_the_parameters(form, alpha, beta):
    d = [0.25 * i for i in range(1, 25)]
    fit = fit_gao(form, d, gao_curve(form, alpha, beta, d))
    assert fit.alpha == pytest.approx(alpha, abs=1e-9)
    assert fit.beta == pytest.approx(beta, abs=1e-9)
    assert fit.r2 == pytest.approx(1.0)


def test_noisy_points_give_back_the_parameters_closely():
    rng = random.Random(0)
    d = [0.1 * i for i in range(1, 101)]
    gain = [y + rng.gauss(0, 0.02) for y in gao_curve("rl", 0.8, 0.25, d)]
    fit = fit_gao("rl", d, gain)
    assert fit.alpha == pytest.approx(0.8, abs=0.02)
    assert fit.beta == pytest.approx(0.25, abs=0.01)


def test_peaks_by_hand():
    bon = fit_gao("bon", [1.0, 2.0, 3.0], gao_curve("bon", 1.2, 0.3, [1.0, 2.0, 3.0]))
    assert bon.peak_d == pytest.approx(2.0)  # alpha / (2 beta)
    assert bon.peak_gain == pytest.approx(2.0 * (1.2 - 0.6))
    rl = fit_gao("rl", [0.5, 1.0, 4.0], gao_curve("rl", 0.5, 0.25, [0.5, 1.0, 4.0]))
    assert rl.peak_d == pytest.approx(math.e)  # exp(alpha / beta - 1) = exp(1)
    # the derivative alpha - beta (log d + 1) is zero there
    assert 0.5 - 0.25 * (math.log(rl.peak_d) + 1) == pytest.approx(0.0)


def test_a_curve_that_never_turns_has_no_peak():
    d = [1.0, 2.0, 3.0]
    fit = fit_gao("bon", d, [2 * x + 0.1 * x * x for x in d])
    assert fit.beta == pytest.approx(-0.1)
    assert fit.peak_d is None and fit.peak_gain is None


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least two"):
        fit_gao("rl", [1.0], [0.5])
    with pytest.raises(ValueError, match="distinct"):
        fit_gao("bon", [2.0, 2.0, 2.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="form"):
        fit_gao("ppo", [1.0, 2.0], [1.0, 2.0])


def test_divergence_fires_only_when_proxy_rises_and_truth_falls():
    assert divergence([0.1, 0.5, 0.9], [0.3, 0.2, 0.1])
    assert not divergence([0.1, 0.5, 0.9], [0.1, 0.2, 0.3])
    assert not divergence([0.9, 0.5, 0.1], [0.3, 0.2, 0.1])
    assert not divergence([0.1, 0.9], [0.3, 0.1])  # fewer than window points
    assert not divergence([0.1, 0.5, 0.9], [0.3, 0.3, 0.29], tolerance=0.05)
