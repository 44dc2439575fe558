"""Export to training records and aggregation of overlapping judgments, with hand-worked numbers."""

from datetime import datetime, timedelta

import pytest

from kilter.data.records import validate_record
from kilter.errors import KilterError
from kilter.feedback import export
from kilter.feedback.analysis import (
    battles,
    leaderboard_report,
    quality,
    style_controlled,
    style_features,
)
from kilter.feedback.store import CandidateRow, JudgmentRecord

T0 = datetime(2025, 1, 1, 12, 0, 0)
_ids = iter(range(1, 10_000))


def cands(*texts, models=None):
    models = models or [""] * len(texts)
    return [CandidateRow(100 + i, i, models[i], t, {"temperature": 1.0}) for i, t in enumerate(texts)]


def rec(task, user, item, candidates, *, seconds=10.0, gold=None, **fields):
    base = dict(choice=None, preferred_candidate_id=None, strength=None, tie=False, both_bad=False, label=None,
                responses=[], text=None, comment="")
    base.update(fields)
    return JudgmentRecord(next(_ids), task, user, item, gold is not None, gold, f"prompt {item}", None, candidates,
                          T0 + timedelta(seconds=seconds), T0, [c.id for c in candidates], **base)


def pair(user, item, candidates, choice):
    """A pairwise judgment given with the candidates shown in slot order."""
    if choice in ("tie", "both_bad"):
        return rec("pairwise", user, item, candidates, choice=choice, tie=choice == "tie", both_bad=choice == "both_bad")
    side = 0 if choice[0] == "A" else 1
    return rec("pairwise", user, item, candidates, choice=choice, preferred_candidate_id=candidates[side].id,
               strength=int(choice[1]) / 4)


def ranking(user, item, candidates, ranks):
    return rec("ranking", user, item, candidates,
               responses=[{"candidate": c.id, "position": i, "rank": r, "score": 4, "flags": []}
                          for i, (c, r) in enumerate(zip(candidates, ranks))])


X, Y = "answer X", "answer Y"


def test_pairwise_each_mean_and_majority():
    c = cands(X, Y)
    # three people: X much better (+1.0), X slightly better (+0.25), Y better (-0.75)
    records = [pair("u1", 1, c, "A4"), pair("u2", 1, c, "A1"), pair("u3", 1, c, "B3")]
    each = export.build(records, "pairwise", "comparisons", "each")
    assert [(r["chosen"], r["strength"]) for r in each] == [(X, 1.0), (X, 0.25), (Y, 0.75)]
    # mean of +1.0, +0.25, -0.75 = +0.5/3 = 0.1667: X chosen, weakly
    (mean,) = export.build(records, "pairwise", "comparisons", "mean")
    assert (mean["chosen"], mean["rejected"]) == (X, Y) and mean["strength"] == pytest.approx(0.5 / 3, abs=1e-6)
    # majority: two votes for X with strengths 1.0 and 0.25 -> strength 0.625
    (major,) = export.build(records, "pairwise", "comparisons", "majority")
    assert (major["chosen"], major["strength"]) == (X, 0.625)
    for row in each + [mean, major]:
        validate_record(row, "comparison")


def test_pairwise_ties_and_splits_give_no_comparison():
    c = cands(X, Y)
    tie_only = [pair("u1", 1, c, "tie"), pair("u2", 1, c, "both_bad")]
    assert export.build(tie_only, "pairwise", "comparisons", "each") == []
    split = [pair("u1", 2, c, "A2"), pair("u2", 2, c, "B2"), pair("u3", 2, c, "tie")]
    assert export.build(split, "pairwise", "comparisons", "mean") == []  # mean exactly 0
    assert export.build(split, "pairwise", "comparisons", "majority") == []  # 1 vs 1


def test_min_judgments_drops_unfinished_items():
    c = cands(X, Y)
    records = [pair("u1", 1, c, "A4"), pair("u2", 1, c, "A4"), pair("u1", 2, c, "B4")]
    rows = export.build(records, "pairwise", "comparisons", "majority", min_judgments=2)
    assert len(rows) == 1 and rows[0]["prompt"] == "prompt 1"


def test_rankings_each_and_mean_rank():
    c = cands("r0", "r1", "r2")
    records = [ranking("u1", 1, c, [1, 2, 3]), ranking("u2", 1, c, [2, 1, 3]), ranking("u3", 1, c, [1, 3, 2])]
    each = export.build(records, "ranking", "rankings", "each")
    assert [r["ranks"] for r in each] == [[1, 2, 3], [2, 1, 3], [1, 3, 2]]
    # mean ranks: r0 = 4/3, r1 = 2, r2 = 8/3 -> 1, 2, 3
    (mean,) = export.build(records, "ranking", "rankings", "mean")
    assert mean == {"prompt": "prompt 1", "responses": ["r0", "r1", "r2"], "ranks": [1, 2, 3]}
    validate_record(mean, "ranking")
    # equal mean ranks tie: [1,2] and [2,1] -> both 1.5 -> ranks 1, 1
    tie = export.build([ranking("u1", 2, c[:2], [1, 2]), ranking("u2", 2, c[:2], [2, 1])], "ranking", "rankings", "mean")
    assert tie[0]["ranks"] == [1, 1]
    # as comparisons: every pair with different ranks, best first
    pairs = export.build([records[0]], "ranking", "comparisons", "each")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("r0", "r1"), ("r0", "r2"), ("r1", "r2")]


def test_ratings_each_and_majority():
    c = cands("ok answer")
    records = [rec("rating", u, 1, c, label=v) for u, v in (("u1", True), ("u2", True), ("u3", False))]
    assert [r["label"] for r in export.build(records, "rating", "ratings", "each")] == [True, True, False]
    (major,) = export.build(records, "rating", "ratings", "majority")
    assert major == {"prompt": "prompt 1", "completion": "ok answer", "label": True}
    validate_record(major, "rating")
    split = records[1:]
    assert export.build(split, "rating", "ratings", "mean") == []


def test_edits_become_comparisons_and_demonstrations():
    c = cands("orig text")
    records = [rec("edit", "u1", 1, c, text="fixed text"), rec("edit", "u2", 1, c, text="  orig text \n")]
    comps = export.build(records, "edit", "comparisons", "mean")  # edits are never merged
    assert comps == [{"prompt": "prompt 1", "chosen": "fixed text", "rejected": "orig text", "strength": 1.0}]
    demos = export.build(records, "edit", "demonstrations")
    assert demos == [{"prompt": "prompt 1", "completion": "fixed text"}]
    validate_record(comps[0], "comparison")
    validate_record(demos[0], "demonstration")


def test_an_edit_that_changed_only_line_endings_is_no_edit():
    """Browsers send CRLF and drop a textarea's leading newline: neither is an edit (issue 18, defect 4)."""
    c = cands("\nFirst line.\nSecond line.\n")
    unchanged = [rec("edit", "u1", 1, c, text="First line.\r\nSecond line.\r\n"),
                 rec("edit", "u2", 1, c, text="First line.\nSecond line.")]
    assert export.build(unchanged, "edit", "comparisons") == []
    assert export.build(unchanged, "edit", "demonstrations") == []
    changed = [rec("edit", "u3", 1, c, text="First line.\r\n\r\nSecond line, better.\r\n")]
    (comp,) = export.build(changed, "edit", "comparisons")
    assert comp["chosen"] == "First line.\r\n\r\nSecond line, better.\r\n"  # byte-exact otherwise
    assert comp["rejected"] == "\nFirst line.\nSecond line.\n"


def test_records_a_trainer_would_refuse_are_left_out_and_counted():
    twins = cands("Same text.", "Same text.\r\n")  # stored before the import check existed
    empty = cands("", "fine answer")
    records = [pair("u1", 1, twins, "A3"), pair("u1", 2, empty, "B2"), pair("u1", 3, cands(X, Y), "A1")]
    problems: list[str] = []
    rows = export.build(records, "pairwise", "comparisons", problems=problems)
    assert rows == [{"prompt": "prompt 3", "chosen": X, "rejected": Y, "strength": 0.25}]
    assert len(problems) == 2 and "differ only in line endings" in problems[0] and "'rejected'" in problems[1]


def test_raw_records_keep_everything():
    c = cands(X, Y, models=["m1", "m2"])
    (row,) = export.build([pair("u1", 1, c, "B2")], "pairwise", "raw", project="p")
    assert row["annotator"] == "u1" and row["choice"] == "B2" and row["strength"] == 0.5
    assert row["candidates"][1] == {"id": 101, "slot": 1, "model": "m2", "text": Y, "sampling": {"temperature": 1.0}}
    assert row["display_order"] == [100, 101] and row["seconds"] == 10.0
    assert row["shown_at"] == "2025-01-01T12:00:00Z"


def test_wrong_kind_or_aggregation_is_a_clear_error():
    with pytest.raises(KilterError, match="a pairwise project exports comparisons, raw"):
        export.build([], "pairwise", "ratings")
    with pytest.raises(KilterError, match="aggregate must be one of"):
        export.build([], "pairwise", "comparisons", "median")


def test_quality_gold_accuracy_peer_agreement_and_flags():
    c = cands(X, Y)
    gold = {"preferred": 0}
    records = []
    # 6 ordinary items judged by good1, good2 (agree: X better) and troll (always Y better)
    for item in range(1, 7):
        records += [pair("good1", item, c, "A3"), pair("good2", item, c, "A2"), pair("troll", item, c, "B4")]
    # 5 gold items where X is known to be better
    for item in range(100, 105):
        for user, choice in (("good1", "A2"), ("good2", "A2"), ("troll", "B2")):
            side = 0 if choice[0] == "A" else 1
            records.append(rec("pairwise", user, item, c, gold=gold, choice=choice,
                               preferred_candidate_id=c[side].id, strength=0.5))
    report = quality(records, "pairwise")
    stats = {a.name: a for a in report.annotators}
    # the troll fails gold, so good1 is compared with good2 only (6/6); the troll with both (0/12)
    assert stats["good1"].peer == (6, 6) and stats["troll"].peer == (0, 12)
    assert stats["good1"].gold == (5, 5) and stats["troll"].gold == (0, 5)
    assert list(report.flagged) == ["troll"]
    assert "gold accuracy 0.00 (0/5)" in report.flagged["troll"][0]
    assert stats["good1"].median_seconds == 10.0
    assert report.alpha_level == "ordinal" and report.alpha < 0.2  # the troll wrecks agreement


def test_alpha_is_one_when_everyone_agrees_exactly():
    c = cands(X, Y)
    records = []
    for item, choice in ((1, "A4"), (2, "B2"), (3, "A1"), (4, "B4")):
        records += [pair("u1", item, c, choice), pair("u2", item, c, choice)]
    assert quality(records, "pairwise").alpha == pytest.approx(1.0)
    ratings = [rec("rating", u, i, c[:1], label=i % 2 == 0) for i in range(4) for u in ("u1", "u2")]
    report = quality(ratings, "rating")
    assert report.alpha == pytest.approx(1.0) and report.alpha_level == "nominal"


def test_battles_from_pairwise_and_rankings():
    c = cands(X, Y, models=["big", "small"])
    b = battles([pair("u", 1, c, "A1"), pair("u", 2, c, "B3"), pair("u", 3, c, "both_bad")])
    assert [(x.model_a, x.model_b, x.outcome) for x in b] == [("big", "small", "a"), ("big", "small", "b"),
                                                              ("big", "small", "tie")]
    same = cands(X, Y, models=["m", "m"])
    assert battles([pair("u", 1, same, "A1")]) == []  # a model against itself says nothing
    three = cands("a", "b", "c", models=["p", "q", "p"])
    out = battles([ranking("u", 1, three, [2, 1, 2])])
    # pairs with different models: (p0, q) -> q wins; (q, p2) -> q wins
    assert [(x.model_a, x.model_b, x.outcome) for x in out] == [("p", "q", "b"), ("q", "p", "a")]
    gold_item = rec("pairwise", "u", 9, c, gold={"preferred": 0}, choice="A1", preferred_candidate_id=c[0].id, strength=0.25)
    assert battles([gold_item]) == []


def _battle_records(models_per_item, user="u1", start=1):
    out = []
    for n, (a, b) in enumerate(models_per_item, start=start):
        out.append(pair(user, n, cands(f"{a} says {n}", f"{b} says {n}", models=[a, b]), "A2"))
    return out


def test_leaderboard_says_what_flagged_annotators_took_away():
    """Issue 18, defect 7: with every annotator flagged the board said "No battles yet" while 17 existed."""
    records = _battle_records([("m1", "m2")] * 17, user="troll")
    board = leaderboard_report(records, exclude=["troll", "nobody"])
    assert board.rows == [] and board.excluded_battles == 17 and board.excluded_annotators == ["nobody", "troll"]


def test_leaderboard_rates_disconnected_groups_separately():
    records = _battle_records([("a1", "a2")] * 4 + [("b1", "b2")] * 3, start=1)
    board = leaderboard_report(records, n_bootstrap=0)
    assert board.disconnected and board.groups == [["a1", "a2"], ["b1", "b2"]]
    assert {r["model"]: r["group"] for r in board.rows} == {"a1": 1, "a2": 1, "b1": 2, "b2": 2}
    assert board.few_battles == ["a1", "a2", "b1", "b2"]
    joined = leaderboard_report(records + _battle_records([("a2", "b1")], start=50), n_bootstrap=0)
    assert not joined.disconnected and {r["group"] for r in joined.rows} == {1}


def _styled(a_model, b_model, a_text, b_text, a_wins, item):
    c = cands(a_text, b_text, models=[a_model, b_model])
    return pair("u1", item, c, "A2" if a_wins else "B2")


def test_style_control_takes_out_what_length_explains():
    """Model "verbose" wins 65% of its battles, but only because its answer is the longer one in 75%
    of them and the longer answer wins 80% of the time whoever wrote it: with length as a
    covariate the two models tie (worked: 0.75 * 0.8 + 0.25 * 0.2 = 0.65)."""
    short, long = "short answer", "a much longer answer " * 20
    records = []
    for n in range(80):
        verbose_long = n % 4 != 0  # 60 of 80 battles
        longer_wins = n % 5 != 0  # 64 of 80, spread evenly over both cases
        a_text, b_text = (long, short) if verbose_long else (short, long)
        records.append(_styled("verbose", "terse", a_text, b_text, a_wins=verbose_long == longer_wins, item=n))
    plain = {r["model"]: r["bt"] for r in leaderboard_report(records, n_bootstrap=0).rows}
    style = style_controlled(records)
    assert plain["verbose"] - plain["terse"] > 90  # 65% wins: about 107 Elo points
    assert abs(style.ratings["verbose"] - style.ratings["terse"]) < 5
    # log-odds of 80% = 1.39 per sign of the (standardised, here +-1) length difference
    assert style.coefficients["length"] == pytest.approx(1.386, abs=0.2) and style.battles == 80


def test_style_control_keeps_a_real_difference_and_needs_enough_battles():
    records = [_styled("good", "bad", "x" * (10 + n % 3), "y" * (10 + (n + 1) % 3), a_wins=n % 4 != 0, item=n)
               for n in range(40)]
    style = style_controlled(records)
    assert style.ratings["good"] - style.ratings["bad"] > 150
    assert style_controlled(records[:3]) is None
    assert style_features("# Title\n\n- one\n- two\n\n**bold** and `code`") == (41.0, 5.0)


def test_per_category_leaderboard():
    records = _battle_records([("m1", "m2")] * 3)
    from dataclasses import replace

    tagged = [replace(r, category="coding" if i < 2 else "chat") for i, r in enumerate(records)]
    assert leaderboard_report(tagged, category="coding", n_bootstrap=0).battles == 2
    assert leaderboard_report(tagged, category="chat", n_bootstrap=0).battles == 1
