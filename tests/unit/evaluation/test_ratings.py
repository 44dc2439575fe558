import json
import math
import subprocess
import sys

import numpy as np
import pytest

from kilter.errors import KilterError
from kilter.evaluation.ratings import (
    Battle,
    bradley_terry,
    bradley_terry_bootstrap,
    elo_ratings,
    expected_score,
    leaderboard,
)

# true strengths in natural log-odds: P(i beats j) = sigmoid(s_i - s_j)
TRUE = {"weak": -1.0, "fair": -0.3, "good": 0.3, "best": 1.0}


def sample_battles(n: int, seed: int = 0, tie_prob: float = 0.0) -> list[Battle]:
    rng = np.random.default_rng(seed)
    names = list(TRUE)
    out = []
    for _ in range(n):
        a, b = rng.choice(len(names), size=2, replace=False)
        ma, mb = names[a], names[b]
        if rng.random() < tie_prob:
            outcome = "tie"
        else:
            p = 1.0 / (1.0 + math.exp(-(TRUE[ma] - TRUE[mb])))
            outcome = "a" if rng.random() < p else "b"
        out.append(Battle(ma, mb, outcome))
    return out


def order(ratings: dict[str, float]) -> list[str]:
    return sorted(ratings, key=ratings.get)


def to_log_odds(ratings: dict[str, float], names: list[str]) -> np.ndarray:
    return np.array([(ratings[m] - 1000.0) * math.log(10.0) / 400.0 for m in names])


def test_expected_score_by_hand():
    assert expected_score(1000, 1000) == 0.5
    # 400 points ahead means odds of 10:1
    assert expected_score(1400, 1000) == pytest.approx(10 / 11)
    assert expected_score(1000, 1400) == pytest.approx(1 / 11)
    assert expected_score(1100, 1000, scale=100) == pytest.approx(10 / 11)


def test_elo_one_step_by_hand():
    # equal ratings: E = 0.5, so the winner gains k * 0.5
    assert elo_ratings([("x", "y", "a")], k=32) == {"x": 1016.0, "y": 984.0}
    assert elo_ratings([("x", "y", "b")]) == {"x": 998.0, "y": 1002.0}
    assert elo_ratings([("x", "y", "tie")]) == {"x": 1000.0, "y": 1000.0}


def test_elo_second_step_by_hand():
    # after x beats y: x = 1002, y = 998. Then y beats x:
    # E_y = 1 / (1 + 10 ** (4 / 400)) = 1 / 2.0232929922807541 = 0.4942437...
    # y gains 4 * (1 - 0.4942437) = 2.0230251
    r = elo_ratings([("x", "y", "a"), ("y", "x", "a")])
    assert r["y"] == pytest.approx(998 + 2.0230251, abs=1e-6)
    assert r["x"] == pytest.approx(1002 - 2.0230251, abs=1e-6)
    # a tie between unequal players moves the stronger one down
    r = elo_ratings([("x", "y", "a"), ("x", "y", "tie")])
    assert r["x"] < 1002 and r["y"] > 998


def test_elo_and_bt_recover_true_order():
    battles = sample_battles(3000, seed=1)
    truth = order(TRUE)
    assert order(elo_ratings(battles)) == truth
    assert order(bradley_terry(battles)) == truth


def test_bt_mean_is_base_and_gap_matches_truth():
    battles = sample_battles(3000, seed=2)
    r = bradley_terry(battles, base=1500.0)
    assert np.mean(list(r.values())) == pytest.approx(1500.0)
    estimate = to_log_odds({m: v - 500.0 for m, v in r.items()}, list(TRUE))
    # 3000 battles: each strength is known to about +-0.1 log-odds
    assert np.max(np.abs(estimate - np.array(list(TRUE.values())))) < 0.25


def test_bt_two_models_by_hand():
    # A beats B 3 times out of 4: MLE of theta_A - theta_B is ln 3, i.e. 400 * log10(3) points
    r = bradley_terry([("A", "B", "a")] * 3 + [("A", "B", "b")])
    gap = 400 * math.log10(3)
    assert r["A"] == pytest.approx(1000 + gap / 2, abs=1e-3)
    assert r["B"] == pytest.approx(1000 - gap / 2, abs=1e-3)


def test_bt_ties_count_half_a_win_each():
    two_wins_two_ties = [("A", "B", "a")] * 2 + [("A", "B", "tie")] * 2
    three_one = [("A", "B", "a")] * 3 + [("B", "A", "a")]
    assert bradley_terry(two_wins_two_ties) == pytest.approx(bradley_terry(three_one))
    dropped = bradley_terry(three_one + [("A", "B", "tie")] * 5, ties="drop")
    assert dropped == pytest.approx(bradley_terry(three_one))


def test_all_ties_give_equal_ratings():
    battles = [("A", "B", "tie"), ("B", "C", "tie"), ("C", "A", "tie"), ("A", "B", "tie")]
    for r in (bradley_terry(battles), elo_ratings(battles), bradley_terry(battles, ties="drop")):
        assert r == pytest.approx({"A": 1000.0, "B": 1000.0, "C": 1000.0})


def test_bt_does_not_depend_on_battle_order_but_elo_does():
    battles = sample_battles(400, seed=3)
    shuffled = [battles[i] for i in np.random.default_rng(0).permutation(len(battles))]
    assert bradley_terry(shuffled) == pytest.approx(bradley_terry(battles), abs=1e-6)
    assert elo_ratings(shuffled) != pytest.approx(elo_ratings(battles), abs=1e-6)


def test_unbeaten_model_stays_finite():
    r = bradley_terry([("A", "B", "a")] * 5 + [("B", "C", "a")] * 3 + [("C", "B", "a")])
    assert all(math.isfinite(v) for v in r.values())
    assert r["A"] > r["B"] > r["C"]


def test_bt_matches_sklearn_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    battles = sample_battles(3000, seed=4, tie_prob=0.15)
    names = sorted(TRUE)
    col = {m: i for i, m in enumerate(names)}
    rows, ys, weights = [], [], []
    for b in battles:
        x = np.zeros(len(names))
        x[col[b.model_a]], x[col[b.model_b]] = 1.0, -1.0
        # a tie is two half-weight observations, one win each way
        labelled = {"a": [(1.0, 1.0)], "b": [(0.0, 1.0)], "tie": [(1.0, 0.5), (0.0, 0.5)]}[b.outcome]
        for y, w in labelled:
            rows.append(x)
            ys.append(y)
            weights.append(w)
    lr = sklearn.LogisticRegression(C=1e6, fit_intercept=False, tol=1e-10, max_iter=10_000)
    lr.fit(np.array(rows), np.array(ys), sample_weight=np.array(weights))
    reference = lr.coef_[0] - lr.coef_[0].mean()
    ours = to_log_odds(bradley_terry(battles), names)
    np.testing.assert_allclose(ours, reference, atol=1e-2)


def test_bootstrap_interval_contains_estimate_and_narrows_with_data():
    few = bradley_terry_bootstrap(sample_battles(300, seed=5), n_rounds=100, seed=0)
    many = bradley_terry_bootstrap(sample_battles(3000, seed=5), n_rounds=100, seed=0)
    for result in (few, many):
        for ci in result.values():
            assert ci.lower <= ci.rating <= ci.upper
    for m in TRUE:
        assert many[m].upper - many[m].lower < few[m].upper - few[m].lower
    # the point estimate is the plain fit, and the same seed gives the same intervals
    assert {m: ci.rating for m, ci in many.items()} == pytest.approx(
        bradley_terry(sample_battles(3000, seed=5))
    )
    again = bradley_terry_bootstrap(sample_battles(300, seed=5), n_rounds=100, seed=0)
    assert again == few


def test_bootstrap_rejects_bad_arguments():
    with pytest.raises(KilterError, match="n_rounds"):
        bradley_terry_bootstrap([("A", "B", "a")], n_rounds=0)
    with pytest.raises(KilterError, match="ci"):
        bradley_terry_bootstrap([("A", "B", "a")], ci=1.5)


def test_leaderboard_rows():
    battles = [("A", "B", "a"), ("A", "B", "a"), ("B", "A", "tie"), ("C", "A", "b"), ("B", "C", "a")]
    rows = leaderboard(battles, n_bootstrap=20)
    assert [r["model"] for r in rows] == ["A", "B", "C"]
    assert [r["rank"] for r in rows] == [1, 2, 3]
    a = rows[0]
    assert (a["battles"], a["wins"], a["losses"], a["ties"]) == (4, 3, 0, 1)
    assert a["win_rate"] == pytest.approx(3.5 / 4)
    b = rows[1]
    assert (b["battles"], b["wins"], b["losses"], b["ties"]) == (4, 1, 2, 1)
    assert b["win_rate"] == pytest.approx(1.5 / 4)
    assert rows[2]["win_rate"] == 0.0
    assert a["bt"] == pytest.approx(bradley_terry(battles)["A"])
    assert a["elo"] == pytest.approx(elo_ratings(battles)["A"])
    assert a["bt_lower"] <= a["bt"] <= a["bt_upper"]
    json.dumps(rows)  # rows go straight into the web app's JSON responses

    plain = leaderboard(battles, n_bootstrap=0)
    assert plain[0]["bt_lower"] is None and plain[0]["bt_upper"] is None
    assert leaderboard([]) == []


def test_bad_battles_are_rejected():
    with pytest.raises(KilterError, match="outcome"):
        elo_ratings([("A", "B", "win")])
    with pytest.raises(KilterError, match="itself"):
        bradley_terry([("A", "A", "a")])
    with pytest.raises(KilterError, match="battle 1"):
        bradley_terry([("A", "B", "a"), ("A", "B")])
    with pytest.raises(KilterError, match="ties"):
        bradley_terry([("A", "B", "a")], ties="davidson")


def test_package_exports_lazily_without_torch():
    # the web app imports kilter.evaluation; it must not drag torch in
    code = (
        "import sys\n"
        "from kilter.evaluation import leaderboard, krippendorff_alpha, bleu\n"
        "from kilter.evaluation.ratings import leaderboard as direct\n"
        "assert leaderboard is direct\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
