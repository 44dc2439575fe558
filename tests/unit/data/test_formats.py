"""Public data layouts (kilter.data.formats): each fixture file read as Kilter records, detection, errors."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from kilter.data.formats import (
    FORMATS,
    DataFormat,
    detect_layout,
    read_layout,
    shp_strength,
)
from kilter.data.preferences import detect_kind, load_preference_groups
from kilter.data.sources import hold_out, load_records, load_train_eval, parse_spec
from kilter.errors import DataError, KilterError

LAYOUTS = Path(__file__).resolve().parents[2] / "fixtures" / "layouts"
USER = {"role": "user", "content": "Write a short review of the film."}


def test_config_literal_lists_every_format():
    assert set(typing.get_args(DataFormat)) == set(FORMATS)


def test_ultrafeedback_comparisons_take_the_shared_messages_as_prompt():
    records = load_records(str(LAYOUTS / "ultrafeedback.jsonl"), "comparison")
    assert records.layout == "ultrafeedback" and len(records) == 8
    assert records[0] == {"prompt": [USER], "chosen": "The film was warm and lovely, I would go again.",
                          "rejected": "The film was bad.", "strength": None}
    assert detect_kind(str(LAYOUTS / "ultrafeedback.jsonl")) == "comparison"


def test_ultrafeedback_messages_column_is_the_sft_data():
    records = load_records(str(LAYOUTS / "ultrafeedback.jsonl"), "demonstration")
    assert records[0] == {"prompt": [USER], "completion": "The film was warm and lovely, I would go again."}


def test_alpaca_instruction_and_input_form_one_user_turn():
    records = load_records(str(LAYOUTS / "alpaca.json"), "demonstration")
    assert records.layout == "alpaca" and len(records) == 8
    assert records[0] == {"prompt": [{"role": "user", "content": "Write a short review.\n\nthe film"}],
                          "completion": "The film was warm and lovely, I would go again."}
    # an empty input adds nothing to the instruction
    assert records[1]["prompt"] == [{"role": "user", "content": "Write a short review."}]


def test_sharegpt_roles_map_and_every_turn_is_kept():
    records = load_records(str(LAYOUTS / "sharegpt.json"), "demonstration")
    assert records.layout == "sharegpt"
    assert records[0]["messages"] == [
        {"role": "system", "content": "You write short reviews."},
        {"role": "user", "content": "Review the film."},
        {"role": "assistant", "content": "The film was warm and lovely, I would go again."},
        {"role": "user", "content": "Now a bad one."},
        {"role": "assistant", "content": "The film was bad."},
    ]
    assert records[0]["completion"] == "The film was bad."
    assert load_records(str(LAYOUTS / "sharegpt.json"), "prompt")[0]["prompt"][-1] == {
        "role": "user", "content": "Now a bad one."}


def test_sharegpt_unknown_speaker_names_the_turn(tmp_path):
    path = tmp_path / "sg.jsonl"
    path.write_text(json.dumps({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}) + "\n")
    with pytest.raises(DataError) as info:
        load_records(str(path), "demonstration")
    assert str(info.value) == (f"{path}:1: field 'conversations': turn 2: 'from' must be one of human, gpt, system, "
                               "got 'bot'")


def test_shp_labels_pick_the_preferred_comment_and_score_ratio_sets_strength():
    records = load_records(str(LAYOUTS / "shp.jsonl"), "comparison")
    assert records.layout == "shp"
    # row 1: labels=1, A preferred, scores 12 vs 3 -> ratio 4 -> strength 1 - 1/4
    assert records[0] == {"prompt": "What did you think of the film?",
                          "chosen": "The film was warm and lovely, I would go again.",
                          "rejected": "The film was bad.", "strength": 0.75}
    # row 2: labels=0, B preferred, scores 2 vs 10 -> ratio 5 -> strength 0.8
    assert records[1]["chosen"] == "The soup was a delight from start to end."
    assert records[1]["rejected"] == "The soup was cold and dull."
    assert records[1]["strength"] == pytest.approx(0.8)
    assert [shp_strength(r) for r in (1, 2, 4, float("inf"))] == [0.0, 0.5, 0.75, 1.0]
    with pytest.raises(DataError, match="score_ratio"):
        shp_strength(0.5)


def test_shp_bad_label_is_a_one_line_error(tmp_path):
    row = json.loads((LAYOUTS / "shp.jsonl").read_text().splitlines()[0])
    row["labels"] = 2
    path = tmp_path / "shp.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError) as info:
        load_records(str(path), "comparison")
    assert str(info.value) == (f"{path}:1: field 'labels': expected 1 (human_ref_A preferred) or 0 "
                               "(human_ref_B preferred), got 2")


def test_hh_transcripts_convert_on_the_fly_like_convert_hh():
    records = load_records(str(LAYOUTS / "hh.jsonl"), "comparison")
    assert records.layout == "hh"
    assert records[0] == {
        "prompt": "\n\nHuman: Did you like the film?\n\nAssistant: Yes, very much.\n\nHuman: Write a short review of it."
                  "\n\nAssistant:",
        "chosen": "The film was warm and lovely, I would go again.",
        "rejected": "The film was bad.",
        "strength": None,
    }
    groups = load_preference_groups(str(LAYOUTS / "hh.jsonl"))
    assert (groups.kind, groups.n_pairs) == ("comparison", 8)


@pytest.mark.parametrize("name", ["hh.jsonl", "ultrafeedback.jsonl", "shp.jsonl"])
def test_comparisons_given_as_ratings_are_unpaired(name):
    pairs = load_records(str(LAYOUTS / name), "comparison")
    ratings = load_records(str(LAYOUTS / name), "rating")
    assert len(ratings) == 2 * len(pairs)
    assert ratings[0] == {"prompt": pairs[0]["prompt"], "completion": pairs[0]["chosen"], "label": True}
    assert ratings[1] == {"prompt": pairs[0]["prompt"], "completion": pairs[0]["rejected"], "label": False}
    assert any("unpaired into 16 ratings (chosen = desirable, rejected = undesirable)" in n for n in ratings.notes)


def test_rating_labels_accept_one_and_zero(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "p", "completion": "a", "label": 1}\n{"prompt": "p", "completion": "b", "label": 0}\n')
    assert [r["label"] for r in load_records(str(path), "rating")] == [True, False]


def test_a_file_of_no_accepted_layout_lists_fields_and_layouts(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError) as info:
        load_records(str(path), "demonstration")
    message = str(info.value)
    assert message.startswith(f"{path}:1: fields [answer, question]: not demonstration records in any layout")
    assert "use data.format=kilter ({prompt, completion} or {messages})" in message and "data.format=alpaca ({instruction, input, output})" in message
    assert "\n" not in message
    # Alpaca given where comparisons are needed: the error says what the file looks like
    with pytest.raises(DataError) as info:
        load_records(str(LAYOUTS / "alpaca.json"), "comparison")
    assert "fields [input, instruction, output]" in str(info.value)
    assert "it looks like alpaca (demonstration records)" in str(info.value)
    assert "data.format=shp" in str(info.value)


def test_named_format_is_used_and_checked():
    records = read_layout(LAYOUTS / "alpaca.json", "demonstration", "alpaca")
    assert records.layout == "alpaca"
    with pytest.raises(KilterError, match="data.format=alpaca does not hold comparison records"):
        read_layout(LAYOUTS / "alpaca.json", "comparison", "alpaca")
    with pytest.raises(DataError, match=r"alpaca.json:record 1: field 'conversations'"):
        read_layout(LAYOUTS / "alpaca.json", "demonstration", "sharegpt")
    with pytest.raises(KilterError, match="unknown data format 'yaml'"):
        read_layout(LAYOUTS / "alpaca.json", "demonstration", "yaml")


def test_detect_layout_prefers_the_specific_layout():
    hh_row = json.loads((LAYOUTS / "hh.jsonl").read_text().splitlines()[0])
    assert detect_layout(hh_row, "comparison") == ("hh", "comparison")
    assert detect_layout(hh_row, "rating") == ("hh", "comparison")
    assert detect_layout({"prompt": "p", "chosen": "a", "rejected": "b"}, "comparison") == ("kilter", "comparison")


def test_prompt_records_from_messages_drop_the_reply(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": [USER, {"role": "assistant", "content": "ok"}]}) + "\n"
                    + json.dumps({"messages": [USER]}) + "\n")
    assert [r["prompt"] for r in load_records(str(path), "prompt")] == [[USER], [USER]]


def test_pandas_csv_of_message_lists_is_an_error_not_a_string(tmp_path):
    import pandas as pd

    path = tmp_path / "chat.csv"
    pd.DataFrame({"messages": [[USER, {"role": "assistant", "content": "ok"}]]}).to_csv(path, index=False)
    with pytest.raises(DataError) as info:
        load_records(str(path), "demonstration")
    assert str(info.value).startswith(f"{path}:2: field 'messages': the cell looks like a list but is not valid JSON")
    assert "to_json(orient='records', lines=True)" in str(info.value)
    pd.DataFrame({"prompt": [[USER]], "completion": ["ok"]}).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"chat.csv:2: field 'prompt': the cell looks like a list"):
        load_records(str(path), "demonstration")
    # A plain prompt that merely starts with a bracket is still text.
    pd.DataFrame({"prompt": ["[INST] hi"], "completion": ["ok"]}).to_csv(path, index=False)
    assert load_records(str(path), "demonstration")[0]["prompt"] == "[INST] hi"


def test_split_after_a_colon_applies_to_that_folder(tmp_path):
    import datasets

    rows = {"train": [{"prompt": "a", "completion": "x"}] * 3, "test": [{"prompt": "b", "completion": "y"}]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(str(tmp_path / "d"))
    spec = str(tmp_path / "d")
    assert parse_spec(f"{spec}:test") == (spec, "test")
    assert parse_spec("builtin:sft") == ("builtin:sft", None)
    assert len(load_records(spec, "demonstration")) == 3
    assert load_records(f"{spec}:test", "demonstration", split="train")[0]["prompt"] == "b"


def test_hold_out_and_eval_plan(tmp_path):
    rows = [{"i": i} for i in range(40)]
    train, held = hold_out(rows, 0.1, seed=0)
    assert len(held) == 4 and len(train) == 36 and not {r["i"] for r in held} & {r["i"] for r in train}
    assert hold_out(rows, 0.1, seed=0) == (train, held)
    spec = str(LAYOUTS / "alpaca.json")
    tr, ev, said = load_train_eval(spec, "auto", "demonstration", eval_fraction=0.25, seed=0)
    assert (len(tr), len(ev), said) == (6, 2, f"2 records of {spec} held out (data.eval_fraction=0.25)")
    tr, ev, said = load_train_eval(spec, "auto", "demonstration", eval_fraction=0, seed=0)
    assert (len(tr), ev, said) == (8, None, "none (data.eval_fraction=0)")
    tr, ev, said = load_train_eval("builtin:sft", "auto", "demonstration", eval_fraction=0.25, seed=0,
                                   builtin_eval={"builtin:sft": "builtin:sft_eval"})
    assert ev.source == "builtin:sft_eval" and said.endswith("records of builtin:sft_eval")


def test_auto_eval_prompts_never_pair_builtin_eval_with_own_data():
    from kilter.data.sources import resolve_eval_spec

    builtin = {"builtin:prompts": "builtin:prompts_eval"}
    assert resolve_eval_spec("builtin:prompts", "auto", builtin) == ("builtin:prompts_eval", "builtin:prompts_eval")
    spec, why = resolve_eval_spec("mine.jsonl", "auto", builtin)
    assert spec is None and why.startswith("none (auto: mine.jsonl is not built-in")
    assert resolve_eval_spec("mine.jsonl", "held.jsonl", builtin) == ("held.jsonl", "held.jsonl")
    assert resolve_eval_spec("mine.jsonl", None, builtin) == (None, "none (null)")


def test_data_split_applies_to_the_training_folder_only(tmp_path):
    import datasets

    rows = {"train": [{"prompt": "a", "completion": "x"}] * 3, "dev": [{"prompt": "b", "completion": "y"}] * 2,
            "test": [{"prompt": "c", "completion": "z"}]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()}).save_to_disk(str(tmp_path / "d"))
    spec = str(tmp_path / "d")
    train, held, said = load_train_eval(spec, f"{spec}:test", "demonstration", eval_fraction=0.1, seed=0, split="dev")
    assert [r["prompt"] for r in train] == ["b", "b"] and [r["prompt"] for r in held] == ["c"]
    assert said == f"1 records of {spec}:test"


def test_skip_invalid_judges_the_layout_from_the_first_readable_row(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("{not json\n" + (LAYOUTS / "hh.jsonl").read_text())
    with pytest.raises(DataError, match=r"a.jsonl:1: not valid JSON"):
        load_records(str(path), "comparison")
    records = load_records(str(path), "comparison", skip_invalid=True)
    assert records.layout == "hh" and len(records) == 8 and records.n_skipped == 1
