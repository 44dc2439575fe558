"""Form parsing and item planning of the five task types (pure functions, no database)."""

import pytest

from kilter.errors import DataError
from kilter.feedback.importer import (
    CandidateIn,
    check_for_task,
    distinct_responses,
    parse_row,
    read_jsonl,
)
from kilter.feedback.tasks import (
    FormError,
    Shown,
    choice_strength,
    gold_for_item,
    parse_submission,
    plan_items,
)


def form(**fields):
    data = {k: v if isinstance(v, list) else [v] for k, v in fields.items()}
    return lambda name: data.get(name, [])


@pytest.mark.parametrize(
    "choice, position, strength",
    [("A4", 0, 1.0), ("A3", 0, 0.75), ("A2", 0, 0.5), ("A1", 0, 0.25),
     ("B1", 1, 0.25), ("B2", 1, 0.5), ("B3", 1, 0.75), ("B4", 1, 1.0), ("tie", None, None), ("both_bad", None, None)],
)
def test_eight_point_scale_maps_to_side_and_strength(choice, position, strength):
    assert choice_strength(choice) == (position, strength)


def test_pairwise_resolves_the_shown_side_to_the_candidate():
    # candidate 7 was shown as A (left), candidate 3 as B: "B better" prefers candidate 3
    values = parse_submission("pairwise", form(choice="B3", comment="  fine "), Shown([7, 3]))
    assert values["preferred_candidate_id"] == 3
    assert values["strength"] == 0.75
    assert values["choice"] == "B3" and not values["tie"] and not values["both_bad"]
    assert values["display_order"] == [7, 3]
    assert values["comment"] == "fine"


def test_pairwise_tie_and_both_bad_have_no_winner():
    tie = parse_submission("pairwise", form(choice="tie"), Shown([1, 2]))
    bad = parse_submission("pairwise", form(choice="both_bad"), Shown([1, 2]))
    assert (tie["preferred_candidate_id"], tie["strength"], tie["tie"], tie["both_bad"]) == (None, None, True, False)
    assert (bad["preferred_candidate_id"], bad["strength"], bad["tie"], bad["both_bad"]) == (None, None, False, True)


def test_pairwise_flags_are_kept_per_response():
    values = parse_submission("pairwise", form(choice="A1", flags_1=["harmful", "hallucination"]), Shown([5, 6]))
    assert values["responses"] == [
        {"candidate": 5, "position": 0, "flags": []},
        {"candidate": 6, "position": 1, "flags": ["hallucination", "harmful"]},
    ]


@pytest.mark.parametrize("bad", [{}, {"choice": "A5"}, {"choice": "left"}])
def test_pairwise_rejects_missing_or_unknown_choice(bad):
    with pytest.raises(FormError):
        parse_submission("pairwise", form(**bad), Shown([1, 2]))


def test_unknown_flag_is_rejected():
    with pytest.raises(FormError, match="unknown flag"):
        parse_submission("pairwise", form(choice="A1", flags_0="evil"), Shown([1, 2]))


def test_ranking_reads_ranks_scores_and_flags_in_display_order():
    f = form(rank_0="2", rank_1="1", rank_2="2", score_0="4", score_1="7", score_2="3", flags_2="instruction")
    values = parse_submission("ranking", f, Shown([30, 10, 20]))
    assert [(r["candidate"], r["rank"], r["score"], r["flags"]) for r in values["responses"]] == [
        (30, 2, 4, []), (10, 1, 7, []), (20, 2, 3, ["instruction"])]


@pytest.mark.parametrize(
    "fields, message",
    [({"rank_0": "1", "score_0": "4", "score_1": "4"}, "rank of response B"),
     ({"rank_0": "1", "rank_1": "3", "score_0": "4", "score_1": "4"}, "between 1 and 2"),
     ({"rank_0": "1", "rank_1": "2", "score_0": "8", "score_1": "4"}, "between 1 and 7"),
     ({"rank_0": "1", "rank_1": "2", "score_0": "4"}, "score of response B"),
     ({"rank_0": "2", "rank_1": "2", "score_0": "4", "score_1": "4"}, "ranked 1")],
)
def test_ranking_form_errors(fields, message):
    with pytest.raises(FormError, match=message):
        parse_submission("ranking", form(**fields), Shown([1, 2]))


def test_rating_edit_and_demonstration():
    assert parse_submission("rating", form(label="up"), Shown([4]))["label"] is True
    assert parse_submission("rating", form(label="down"), Shown([4]))["label"] is False
    with pytest.raises(FormError):
        parse_submission("rating", form(), Shown([4]))
    edit = parse_submission("edit", form(text="better\r\ntext"), Shown([4], "orig"))
    assert edit["text"] == "better\ntext"  # browsers send CRLF from text areas
    demo = parse_submission("demonstration", form(text="I would say this."), Shown([]))
    assert demo["text"] == "I would say this." and demo["responses"] == []
    with pytest.raises(FormError, match="fill in"):
        parse_submission("demonstration", form(text="   "), Shown([]))


def test_plan_items_tournament_pairs_only_different_models():
    # 2 responses each from 2 models: the 4 cross-model pairs, never a model against itself
    assert plan_items("pairwise", ["m1", "m1", "m2", "m2"]) == [[0, 2], [0, 3], [1, 2], [1, 3]]
    # one model: every pair
    assert plan_items("pairwise", ["m", "m", "m"]) == [[0, 1], [0, 2], [1, 2]]
    assert plan_items("ranking", ["a", "b", "c"]) == [[0, 1, 2]]
    assert plan_items("rating", ["a", "b"]) == [[0], [1]]
    assert plan_items("demonstration", []) == [[]]


def test_gold_for_item():
    assert gold_for_item("pairwise", 1, [0, 1], 2) == {"preferred": 1}
    assert gold_for_item("pairwise", "tie", [0, 1], 2) == {"preferred": None}
    assert gold_for_item("ranking", [2, 1, 3], [0, 1, 2], 3) == {"ranks": [2, 1, 3]}
    assert gold_for_item("rating", [True, False], [1], 2) == {"label": False}
    with pytest.raises(ValueError):
        gold_for_item("pairwise", True, [0, 1], 2)
    with pytest.raises(ValueError):
        gold_for_item("ranking", [1, 1, 4], [0, 1, 2], 3)


def test_import_errors_name_file_line_and_field(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"prompt": "ok", "responses": ["a", "b"]}\n{"prompt": "x", "responses": [{"txt": "a"}]}\n')
    with pytest.raises(DataError, match=r"items.jsonl line 2: field 'responses\[0\].text'"):
        read_jsonl(path)
    path.write_text('{"prompt": "ok", "responses": ["a", "b"]}\n\n{"prompt": "", "responses": ["a"]}\n')
    with pytest.raises(DataError, match=r"line 3: field 'prompt'"):
        read_jsonl(path)
    path.write_text('{"prompt": "ok", "respones": ["a"]}\n')
    with pytest.raises(DataError, match=r"line 1: unknown field 'respones'"):
        read_jsonl(path)
    path.write_text('{"prompt": "ok"\n')
    with pytest.raises(DataError, match=r"line 1: not valid JSON"):
        read_jsonl(path)


def test_check_for_task_counts_gold_and_duplicate_ids():
    one = [parse_row({"prompt": "p", "responses": ["a"]}, "f line 1")]
    with pytest.raises(DataError, match="f line 1: field 'responses': a pairwise project needs at least 2"):
        check_for_task(one, "pairwise")
    dup = [parse_row({"prompt": "p", "id": "x", "responses": ["a", "b"]}, f"f line {i}") for i in (1, 2)]
    with pytest.raises(DataError, match="f line 2: field 'id'"):
        check_for_task(dup, "pairwise")
    bad_gold = [parse_row({"prompt": "p", "responses": ["a", "b"], "gold": 2}, "f line 1")]
    with pytest.raises(DataError, match="f line 1: field 'gold'"):
        check_for_task(bad_gold, "pairwise")
    with pytest.raises(DataError, match="prompts only"):
        check_for_task(one, "demonstration")


def test_import_refuses_what_a_trainer_would_refuse():
    """Empty responses, and the same text twice in a pairwise or ranking item (issue 18, defect 3)."""
    for empty in ("", "  \n", {"text": "\t"}):
        with pytest.raises(DataError, match=r"f line 1: field 'responses\[1\](.text)?': empty response"):
            parse_row({"prompt": "p", "responses": ["fine", empty]}, "f line 1")
    same = [parse_row({"prompt": "p", "responses": ["Same answer.", "other", "Same answer.\r\n"]}, "f line 1")]
    for task in ("pairwise", "ranking"):
        with pytest.raises(DataError, match=r"responses\[0\] and responses\[2\] have the same text"):
            check_for_task(same, task)
    check_for_task(same, "rating")  # thumbs on each response: repeats are harmless there


def test_import_reads_utf8_with_a_bom_and_refuses_other_encodings_nan_and_boolean_ids(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9", "responses": ["a", "b"]}\n')
    assert read_jsonl(path)[0].prompt == "café"
    path.write_bytes(b'{"prompt": "ok", "responses": ["a", "b"]}\n{"prompt": "caf\xe9", "responses": ["a", "b"]}\n')
    with pytest.raises(DataError, match=r"items.jsonl line 2: not UTF-8 text"):
        read_jsonl(path)
    path.write_text('{"prompt": "ok", "id": true, "responses": ["a", "b"]}\n')
    with pytest.raises(DataError, match=r"line 1: field 'id': expected a string or an integer, got true"):
        read_jsonl(path)
    path.write_text('{"prompt": "ok", "responses": [{"text": "a", "sampling": {"temperature": NaN}}, "b"]}\n')
    with pytest.raises(DataError, match=r"line 1: not valid JSON \(NaN is not a JSON number\)"):
        read_jsonl(path)
    path.write_text('{"prompt": "ok", "id": 7, "responses": ["a", "b"]}\n')
    assert read_jsonl(path)[0].external_id == "7"


def test_sampled_rows_lose_empty_and_repeated_responses():
    rows = [parse_row({"prompt": "p1", "responses": [{"text": "same", "model": "a"}, {"text": "same\n", "model": "b"},
                                                      {"text": "other", "model": "b"}]}, "s 1"),
            parse_row({"prompt": "p2", "responses": [{"text": "only", "model": "a"}, {"text": "only", "model": "b"}]}, "s 2")]
    rows[0].responses.append(CandidateIn("   ", "a"))
    kept, dropped = distinct_responses(rows, "pairwise")
    assert [r.prompt for r in kept] == ["p1"] and [c.text for c in kept[0].responses] == ["same", "other"]
    assert dropped == {"empty": 1, "repeated": 2, "prompts": 1}


def test_a_submission_for_an_unknown_task_type_is_a_form_error_not_a_crash():
    with pytest.raises(FormError, match="unknown task type 'poll'"):
        parse_submission("poll", form(choice="A1"), Shown([1, 2]))
