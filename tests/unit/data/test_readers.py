"""Readers: every format, every record kind, and the exact file:line:field error messages."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from kilter.data.readers import Records, read_records, write_jsonl
from kilter.data.records import RECORD_KINDS, FieldError, validate_record
from kilter.errors import DataError, KilterError

USER_HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Run in a temp folder so error messages show the short relative names we wrote."""
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()


def write_lines(name: str, lines: list[str]) -> str:
    path = Path("data") / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_rows(name: str, rows: list) -> str:
    return write_lines(name, [json.dumps(r) for r in rows])


# --------------------------------------------------------------------------- good rows

GOOD = [
    ("text", {"text": "once upon a time", "meta": 1}, {"text": "once upon a time"}),
    ("demonstration", {"prompt": "2+2?", "completion": "4"}, {"prompt": "2+2?", "completion": "4"}),
    (
        "demonstration",
        {"messages": [{"role": "system", "content": "be brief"}, *USER_HI, {"role": "assistant", "content": "hello"}]},
        {"prompt": [{"role": "system", "content": "be brief"}, *USER_HI], "completion": "hello"},
    ),
    (
        "demonstration",  # HF conversational prompt-completion form
        {"prompt": USER_HI, "completion": [{"role": "assistant", "content": "hello"}]},
        {"prompt": USER_HI, "completion": "hello"},
    ),
    (
        "comparison",
        {"prompt": "p", "chosen": "good", "rejected": "bad", "id": 7},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "strength": None},
    ),
    (
        "comparison",
        {"prompt": "p", "chosen": "good", "rejected": "bad", "strength": 1},
        {"prompt": "p", "chosen": "good", "rejected": "bad", "strength": 1.0},
    ),
    (
        "comparison",
        {
            "prompt": USER_HI,
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
            "strength": 0.25,
        },
        {"prompt": USER_HI, "chosen": "hello", "rejected": "go away", "strength": 0.25},
    ),
    (
        "comparison",  # implicit prompt: the shared leading messages of chosen and rejected
        {
            "chosen": [*USER_HI, {"role": "assistant", "content": "hello"}],
            "rejected": [*USER_HI, {"role": "assistant", "content": "go away"}],
        },
        {"prompt": USER_HI, "chosen": "hello", "rejected": "go away", "strength": None},
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]},
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [2, 1, 2]},
    ),
    (
        "rating",
        {"prompt": USER_HI, "completion": "hello", "label": False},
        {"prompt": USER_HI, "completion": "hello", "label": False},
    ),
    ("prompt", {"prompt": "write a poem", "source": "x"}, {"prompt": "write a poem"}),
    ("prompt", {"prompt": USER_HI}, {"prompt": USER_HI}),
]


@pytest.mark.parametrize("kind,row,expected", GOOD)
def test_jsonl_good_rows_are_normalised(kind, row, expected):
    path = write_rows("good.jsonl", [row, row])
    records = read_records(path, kind)
    assert isinstance(records, Records)
    assert records.rows == [expected, expected]
    assert len(records) == 2 and records[0] == expected and list(records) == records.rows
    assert records.n_skipped == 0 and records.source == path and records.kind == kind


def test_every_kind_is_covered_by_good_rows():
    assert {kind for kind, _, _ in GOOD} == set(RECORD_KINDS)


# --------------------------------------------------------------------------- bad rows

BAD = [
    ("comparison", {"prompt": "p", "chosen": "a"}, "field 'rejected': missing"),
    ("comparison", {"prompt": "p", "chosen": "a", "rejected": None}, "field 'rejected': missing"),
    (
        "comparison",
        {"prompt": "p", "chosen": 3, "rejected": "b"},
        "field 'chosen': expected a non-empty string or a list of messages, got 3",
    ),
    (
        "comparison",
        {"prompt": "", "chosen": "a", "rejected": "b"},
        "field 'prompt': expected a non-empty string or a list of messages, got ''",
    ),
    (
        "comparison",
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        "field 'rejected': same text as 'chosen'; a comparison needs two different responses",
    ),
    (
        "comparison",
        {"prompt": "p", "chosen": "a", "rejected": "b", "strength": 1.5},
        "field 'strength': expected a number in [0, 1], got 1.5",
    ),
    (
        "comparison",
        {"prompt": "p", "chosen": "a", "rejected": "b", "strength": "high"},
        "field 'strength': expected a number in [0, 1], got 'high'",
    ),
    (
        "comparison",
        {"prompt": USER_HI, "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
        "field 'chosen': expected a list holding one assistant message, got roles ['user']",
    ),
    (
        "comparison",
        {"prompt": [{"role": "user", "content": 5}], "chosen": "a", "rejected": "b"},
        "field 'prompt': message 1: expected a 'content' string, got 5",
    ),
    ("rating", {"prompt": "p", "completion": "c", "label": 2}, "field 'label': expected true or false (or 1 / 0), got 2"),
    ("rating", {"prompt": "p", "completion": "c", "label": "yes"},
     "field 'label': expected true or false (or 1 / 0), got 'yes'"),
    ("rating", {"prompt": "p", "completion": "c", "label": "true"},
     "field 'label': expected true or false (or 1 / 0), got 'true'"),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 2]},
        "field 'ranks': expected 3 ranks (one per response), got 2",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b", "a"], "ranks": [1, 2, 3]},
        "field 'responses': responses[0] and responses[2] are identical",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", "b"], "ranks": [0, 1]},
        "field 'ranks': expected positive integers (1 = best), got 0",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a"], "ranks": [1]},
        "field 'responses': expected a list of at least 2 responses, got ['a']",
    ),
    (
        "ranking",
        {"prompt": "p", "responses": ["a", ""], "ranks": [1, 2]},
        "field 'responses[1]': expected a non-empty string or a list of messages, got ''",
    ),
    (
        "demonstration",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]},
        "field 'messages': the last message must be from the assistant (the completion), got role 'user'",
    ),
    (
        "demonstration",
        {"messages": [{"role": "assistant", "content": "hello"}]},
        "field 'messages': expected at least one message before the final assistant message",
    ),
    ("demonstration", {"prompt": "p"}, "field 'completion': missing"),
    ("text", {"text": ""}, "field 'text': expected a non-empty string, got ''"),
    ("prompt", {"prompt": 12}, "field 'prompt': expected a non-empty string or a list of messages, got 12"),
]


@pytest.mark.parametrize("kind,row,problem", BAD)
def test_jsonl_bad_row_names_file_line_and_field(kind, row, problem):
    good = GOOD[[k for k, _, _ in GOOD].index(kind)][1]
    path = write_lines("bad.jsonl", [json.dumps(good), "", json.dumps(row), json.dumps(good)])
    with pytest.raises(DataError) as info:
        read_records(path, kind)
    assert str(info.value) == f"data/bad.jsonl:3: {problem}"


def test_validate_record_raises_field_error_with_field_and_problem():
    with pytest.raises(FieldError) as info:
        validate_record({"prompt": "p", "chosen": "a"}, "comparison")
    assert (info.value.field, info.value.problem) == ("rejected", "missing")


def test_jsonl_line_that_is_not_json():
    path = write_lines("pairs.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "chosen":'])
    with pytest.raises(DataError, match=r"^data/pairs\.jsonl:2: not valid JSON \(Expecting value at column 26\)$"):
        read_records(path, "comparison")


def test_jsonl_line_that_is_not_an_object():
    path = write_lines("pairs.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=r"^data/pairs\.jsonl:1: expected an object with named fields, got \[1, 2\]$"):
        read_records(path, "comparison")


def test_skip_invalid_counts_and_leaves_the_notice_to_the_command(caplog):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = write_lines(
        "pairs.jsonl",
        [json.dumps(good), json.dumps({"prompt": "p", "chosen": "a"}), "not json", json.dumps(good), json.dumps(good)],
    )
    with caplog.at_level(logging.WARNING, logger="kilter.data"):
        records = read_records(path, "comparison", skip_invalid=True)
    assert len(records) == 3 and records.n_skipped == 2
    assert records.first_error == "data/pairs.jsonl:2: field 'rejected': missing"
    # the command prints the one notice, from these counts (tests/faults: printed once)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == []


def test_no_valid_rows_is_an_error_unless_allowed():
    path = write_rows("pairs.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match=r"^data/pairs\.jsonl: no valid comparison records \(skipped 1 invalid; first: "):
        read_records(path, "comparison", skip_invalid=True)
    empty = write_lines("empty.jsonl", [""])
    assert read_records(empty, "prompt", allow_empty=True).rows == []
    with pytest.raises(DataError, match="no valid prompt records"):
        read_records(empty, "prompt")


def test_missing_file_unknown_extension_and_unknown_kind():
    with pytest.raises(DataError, match=r"^file not found: data/nope\.jsonl$"):
        read_records("data/nope.jsonl", "prompt")
    Path("data/notes.txt").write_text("hello\n")
    with pytest.raises(DataError, match=r"unsupported file extension '\.txt'; supported: \.jsonl, \.json, \.csv, \.tsv, \.parquet"):
        read_records("data/notes.txt", "prompt")
    path = write_rows("p.jsonl", [{"prompt": "p"}])
    with pytest.raises(KilterError, match="unknown record kind 'pairs'"):
        read_records(path, "pairs")


# --------------------------------------------------------------------------- .json


def test_json_list_and_data_object():
    rows = [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]}]
    Path("data/list.json").write_text(json.dumps(rows))
    Path("data/wrapped.json").write_text(json.dumps({"data": rows, "version": 2}))
    for name in ("data/list.json", "data/wrapped.json"):
        assert read_records(name, "ranking").rows == [{"prompt": "p", "responses": ["a", "b"], "ranks": [1, 2]}]


def test_json_errors_name_the_record():
    rows = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c", "label": "maybe"}]
    Path("data/ratings.json").write_text(json.dumps(rows, indent=2))
    with pytest.raises(DataError) as info:
        read_records("data/ratings.json", "rating")
    assert str(info.value) == "data/ratings.json:record 2: field 'label': expected true or false (or 1 / 0), got 'maybe'"
    Path("data/broken.json").write_text('[{"prompt": "p"},\n oops]')
    with pytest.raises(DataError, match=r"^data/broken\.json: not valid JSON \(Expecting value at line 2 column 2\)$"):
        read_records("data/broken.json", "prompt")
    Path("data/scalar.json").write_text("3")
    with pytest.raises(DataError, match=r"expected a JSON list of records"):
        read_records("data/scalar.json", "prompt")


# --------------------------------------------------------------------------- .csv / .tsv


def write_csv(name: str, header: list[str], rows: list[list[str]], delimiter: str = ",") -> str:
    path = Path("data") / name
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def test_csv_comparisons_with_optional_strength_and_multiline_cells():
    path = write_csv(
        "pairs.csv",
        ["prompt", "chosen", "rejected", "strength", "annotator"],
        [["p1", "good", "bad", "", "ann"], ["line one\nline two", "yes", "no", "0.75", "ann"]],
    )
    assert read_records(path, "comparison").rows == [
        {"prompt": "p1", "chosen": "good", "rejected": "bad", "strength": None},
        {"prompt": "line one\nline two", "chosen": "yes", "rejected": "no", "strength": 0.75},
    ]


def test_csv_line_numbers_count_the_header_and_multiline_cells():
    # line 1 header; line 2 row 1; lines 3-4 row 2 (quoted newline); line 5 row 3 (bad)
    path = write_csv(
        "pairs.csv",
        ["prompt", "chosen", "rejected"],
        [["p", "a", "b"], ["two\nlines", "a", "b"], ["p", "", "b"]],
    )
    with pytest.raises(DataError) as info:
        read_records(path, "comparison")
    assert str(info.value) == "data/pairs.csv:5: field 'chosen': expected a non-empty string or a list of messages, got ''"


def test_csv_json_cells_and_boolean_labels():
    ranking = write_csv(
        "ranks.csv", ["prompt", "responses", "ranks"], [["p", json.dumps(["x", "y", "z"]), "[3, 1, 2]"]]
    )
    assert read_records(ranking, "ranking").rows == [{"prompt": "p", "responses": ["x", "y", "z"], "ranks": [3, 1, 2]}]
    convo = [*USER_HI, {"role": "assistant", "content": "hello"}]
    demos = write_csv("demos.csv", ["messages"], [[json.dumps(convo)]])
    assert read_records(demos, "demonstration").rows == [{"prompt": USER_HI, "completion": "hello"}]
    # a prompt cell that merely starts with "[" but is not a message list stays text
    ratings = write_csv(
        "ratings.csv",
        ["prompt", "completion", "label"],
        [["[draft] title", "ok", "true"], [json.dumps(USER_HI), "ok", "FALSE"]],
    )
    assert read_records(ratings, "rating").rows == [
        {"prompt": "[draft] title", "completion": "ok", "label": True},
        {"prompt": USER_HI, "completion": "ok", "label": False},
    ]


def test_csv_bad_label_and_bad_ranks():
    path = write_csv("ratings.csv", ["prompt", "completion", "label"], [["p", "c", "true"], ["p", "c", "1"], ["p", "c", "0"]])
    assert [r["label"] for r in read_records(path, "rating")] == [True, True, False]
    path = write_csv("ratings.csv", ["prompt", "completion", "label"], [["p", "c", "true"], ["p", "c", "2"]])
    with pytest.raises(DataError) as info:
        read_records(path, "rating")
    assert str(info.value) == "data/ratings.csv:3: field 'label': expected true or false (or 1 / 0), got '2'"
    path = write_csv("ranks.csv", ["prompt", "responses", "ranks"], [["p", '["a", "b"]', "1,2"]])
    with pytest.raises(DataError) as info:
        read_records(path, "ranking")
    assert str(info.value) == "data/ranks.csv:2: field 'ranks': expected a list of positive integers, got '1,2'"


def test_csv_missing_column_and_tsv():
    path = write_csv("pairs.csv", ["prompt", "chosen"], [["p", "a"]])
    with pytest.raises(DataError, match=r"^data/pairs\.csv:2: field 'rejected': missing$"):
        read_records(path, "comparison")
    tsv = write_csv("prompts.tsv", ["prompt"], [["a, with comma"], ["b"]], delimiter="\t")
    assert read_records(tsv, "prompt").rows == [{"prompt": "a, with comma"}, {"prompt": "b"}]


# --------------------------------------------------------------------------- .parquet


def test_parquet_standard_and_conversational_rows_and_errors():
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    conversational = [
        {"prompt": USER_HI, "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "bye"}]},
        {"prompt": USER_HI, "chosen": [{"role": "assistant", "content": "yo"}], "rejected": [{"role": "assistant", "content": "yo"}]},
    ]
    pq.write_table(pa.Table.from_pylist(conversational), "data/pairs.parquet")
    with pytest.raises(DataError) as info:
        read_records("data/pairs.parquet", "comparison")
    assert str(info.value) == (
        "data/pairs.parquet:row 2: field 'rejected': same text as 'chosen'; a comparison needs two different responses"
    )
    records = read_records("data/pairs.parquet", "comparison", skip_invalid=True)
    assert records.rows == [{"prompt": USER_HI, "chosen": "hello", "rejected": "bye", "strength": None}]
    assert records.n_skipped == 1
    table = pa.Table.from_pylist([{"prompt": "p", "completion": "c", "label": True}, {"prompt": "q", "completion": "d", "label": None}])
    pq.write_table(table, "data/ratings.parquet")
    with pytest.raises(DataError, match=r"^data/ratings\.parquet:row 2: field 'label': missing$"):
        read_records("data/ratings.parquet", "rating")
    Path("data/fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"^data/fake\.parquet: cannot read as Parquet"):
        read_records("data/fake.parquet", "rating")


# --------------------------------------------------------------------------- HF save_to_disk


def test_hf_saved_dataset_and_dataset_dict_splits():
    datasets = pytest.importorskip("datasets")
    rows = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "q", "completion": "d", "label": False}]
    datasets.Dataset.from_list(rows).save_to_disk("data/single")
    assert read_records("data/single", "rating").rows == rows
    with pytest.raises(DataError, match=r"holds a single dataset, not a DatasetDict, so split='test' does not apply"):
        read_records("data/single", "rating", split="test")

    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows),
            "test": datasets.Dataset.from_list([{"prompt": "t", "completion": "e", "label": True}]),
        }
    )
    splits.save_to_disk("data/splits")
    assert read_records("data/splits", "rating").rows == rows  # default split: train
    assert read_records("data/splits", "rating", split="test").rows == [{"prompt": "t", "completion": "e", "label": True}]
    with pytest.raises(DataError, match=r"^data/splits: no split 'validation'; available splits: test, train$"):
        read_records("data/splits", "rating", split="validation")


def test_hf_saved_conversational_rows_and_error_location():
    datasets = pytest.importorskip("datasets")
    convo = [*USER_HI, {"role": "assistant", "content": "hello"}]
    bad = [*USER_HI, {"role": "user", "content": "again"}]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"messages": convo}, {"messages": bad}])}).save_to_disk(
        "data/demos"
    )
    with pytest.raises(DataError) as info:
        read_records("data/demos", "demonstration")
    assert str(info.value) == (
        "data/demos[train]:row 2: field 'messages': the last message must be from the assistant (the completion), got role 'user'"
    )
    records = read_records("data/demos", "demonstration", skip_invalid=True)
    assert records.rows == [{"prompt": USER_HI, "completion": "hello"}] and records.n_skipped == 1


def test_folder_that_is_not_a_saved_dataset():
    Path("data/plain").mkdir()
    with pytest.raises(DataError, match=r"^data/plain: a folder, but not a dataset saved with datasets' save_to_disk"):
        read_records("data/plain", "prompt")


# --------------------------------------------------------------------------- write_jsonl


def test_write_jsonl_round_trip_and_replaces_atomically():
    rows = [{"prompt": "héllo", "completion": "wörld"}, {"prompt": USER_HI, "completion": "x"}]
    assert write_jsonl("data/out/demos.jsonl", rows) == 2
    text = Path("data/out/demos.jsonl").read_text(encoding="utf-8")
    assert text.splitlines()[0] == '{"prompt": "héllo", "completion": "wörld"}'
    assert read_records("data/out/demos.jsonl", "demonstration").rows == rows

    def failing():
        yield {"prompt": "new", "completion": "row"}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl("data/out/demos.jsonl", failing())
    assert Path("data/out/demos.jsonl").read_text(encoding="utf-8") == text  # old file intact
    assert sorted(p.name for p in Path("data/out").iterdir()) == ["demos.jsonl"]  # no temp left behind
