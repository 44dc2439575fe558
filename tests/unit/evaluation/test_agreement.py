import itertools
import math

import pytest

from kilter.errors import KilterError
from kilter.evaluation.agreement import (
    coincidence_matrix,
    flag_annotators,
    gold_accuracy,
    krippendorff_alpha,
    pairwise_agreement,
)


def reliability_data() -> dict[int, dict[str, int | None]]:
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability": 4 observers, 12 units."""
    rows = {
        "A": "1 2 3 3 2 1 4 1 2 . . .",
        "B": "1 2 3 3 2 2 4 1 2 5 . 3",
        "C": ". 3 3 3 2 3 4 2 2 5 1 .",
        "D": "1 2 3 3 2 4 4 1 2 5 1 .",
    }
    units: dict[int, dict[str, int | None]] = {u: {} for u in range(12)}
    for coder, row in rows.items():
        for u, v in enumerate(row.split()):
            units[u][coder] = None if v == "." else int(v)
    return units


@pytest.mark.parametrize(
    ("level", "published"),
    [("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)],
)
def test_textbook_example(level, published):
    assert krippendorff_alpha(reliability_data(), level) == pytest.approx(published, abs=5e-4)


def test_textbook_coincidence_matrix():
    values, o = coincidence_matrix(reliability_data())
    assert values == [1, 2, 3, 4, 5]
    # unit 12 has one value and drops out; counting the other 40 values gives the margins
    assert o.sum(axis=1).tolist() == pytest.approx([9, 13, 10, 5, 3])
    # o_11: unit 1 (three 1s) 3*2/2 + unit 8 (three 1s of four) 3*2/3 + unit 11 (two 1s) 2*1/1
    assert o[0, 0] == pytest.approx(7)
    # o_12: unit 6 (1,2,3,4) 1/3 + unit 8 (1,1,2,1) 3*1/3
    assert o[0, 1] == pytest.approx(4 / 3)
    assert (o == o.T).all()


def pairwise_alpha(units, delta) -> float:
    """Alpha from its pair-counting definition, 1 - D_o / D_e, without a coincidence matrix."""
    pairable = [[v for v in u.values() if v is not None] for u in units.values()]
    pairable = [u for u in pairable if len(u) >= 2]
    everything = [v for u in pairable for v in u]
    n = len(everything)
    d_o = sum(
        sum(delta(x, y) for x, y in itertools.permutations(u, 2)) / (len(u) - 1) for u in pairable
    ) / n
    d_e = sum(delta(x, y) for x, y in itertools.permutations(everything, 2)) / (n * (n - 1))
    return 1 - d_o / d_e


def test_matches_pair_counting_definition():
    units = reliability_data()
    assert krippendorff_alpha(units, "nominal") == pytest.approx(
        pairwise_alpha(units, lambda x, y: float(x != y))
    )
    assert krippendorff_alpha(units, "interval") == pytest.approx(
        pairwise_alpha(units, lambda x, y: (x - y) ** 2)
    )


def test_small_case_by_hand():
    # units (a,a) (a,b) (b,b) (b,b): o = [[2, 1], [1, 4]], n_a = 3, n_b = 5, n = 8
    # alpha = 1 - (n - 1) * (o_ab + o_ba) / (2 n_a n_b) = 1 - 7 * 2 / 30 = 8 / 15
    pairs = {1: ("a", "a"), 2: ("a", "b"), 3: ("b", "b"), 4: ("b", "b")}
    units = {u: {"x": x, "y": y} for u, (x, y) in pairs.items()}
    assert krippendorff_alpha(units) == pytest.approx(8 / 15)
    # with two categories every metric is a constant multiple of the nominal one
    numeric = {u: {c: {"a": 1, "b": 3}[v] for c, v in j.items()} for u, j in units.items()}
    assert krippendorff_alpha(numeric, "interval") == pytest.approx(8 / 15)
    assert krippendorff_alpha(numeric, "ordinal") == pytest.approx(8 / 15)
    # a unit only one coder judged cannot be paired and changes nothing; neither does a None
    units[5] = {"x": "a", "y": None}
    units[6] = {"z": "b"}
    assert krippendorff_alpha(units) == pytest.approx(8 / 15)


def test_perfect_and_systematic_disagreement():
    perfect = {u: {"x": u % 3, "y": u % 3, "z": u % 3} for u in range(6)}
    for level in ("nominal", "ordinal", "interval"):
        assert krippendorff_alpha(perfect, level) == 1.0
    # two coders who always disagree do worse than chance
    opposite = {u: {"x": u % 2, "y": 1 - u % 2} for u in range(6)}
    assert krippendorff_alpha(opposite) < 0


def test_undefined_cases_are_nan():
    assert math.isnan(krippendorff_alpha({}))
    assert math.isnan(krippendorff_alpha({1: {"x": 1}, 2: {"y": 2}}))  # nothing pairable
    assert math.isnan(krippendorff_alpha({1: {"x": 1, "y": 1}, 2: {"x": 1, "y": 1}}))  # no variation


def test_bad_level_and_values():
    with pytest.raises(KilterError, match="level"):
        krippendorff_alpha(reliability_data(), "cardinal")
    with pytest.raises(KilterError, match="numeric"):
        krippendorff_alpha({1: {"x": "good", "y": "bad"}}, "interval")


def test_pairwise_agreement_by_hand():
    units = {1: {"A": 1, "B": 1, "C": 2}, 2: {"A": 1, "B": 2}, 3: {"C": 1}, 4: {"A": 2, "D": None}}
    assert pairwise_agreement(units) == {"A": (1, 3), "B": (1, 3), "C": (0, 2)}


def test_gold_accuracy_counts_only_gold_units():
    judgments = [("A", 1, "x"), ("A", 2, "y"), ("A", 3, "z"), ("B", 1, "y"), ("C", 3, "z")]
    gold = {1: "x", 2: "x"}
    assert gold_accuracy(judgments, gold) == {"A": (1, 2), "B": (0, 1)}


def test_flag_annotators():
    peer = {"good": (9, 10), "random": (3, 10), "new": (0, 2), "sloppy": (2, 10)}
    gold = {"good": (5, 5), "random": (2, 6), "new": (0, 1), "cheat": (1, 5)}
    flags = flag_annotators(peer, gold)
    assert set(flags) == {"random", "sloppy", "cheat"}
    assert len(flags["random"]) == 2
    assert flags["random"][0] == "gold accuracy 0.33 (2/6) is below 0.60"
    assert flags["sloppy"] == ["peer agreement 0.20 (2/10) is below 0.50"]
    assert flags["cheat"] == ["gold accuracy 0.20 (1/5) is below 0.60"]
    # "new" has too few items to judge; lowering min_items flags them
    assert "new" in flag_annotators(peer, gold, min_items=1)
