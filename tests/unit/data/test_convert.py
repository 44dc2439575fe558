"""The Anthropic HH transcript converter, worked by hand on a two-turn conversation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kilter.cli import main as cli_main
from kilter.config import load_config
from kilter.data.convert import ConvertHHConfig, hh_to_messages, run, split_hh_pair
from kilter.data.readers import read_records
from kilter.errors import ConfigError, DataError

HISTORY = "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke"
CHOSEN = HISTORY + "\n\nAssistant: Why did the chicken cross the road?"
REJECTED = HISTORY + "\n\nAssistant: No."


def test_split_hh_pair_two_turns():
    pair = split_hh_pair(CHOSEN, REJECTED)
    assert pair == {
        "prompt": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:",
        "chosen": "Why did the chicken cross the road?",
        "rejected": "No.",
    }
    # prompt + " " + response rebuilds each transcript exactly
    assert pair["prompt"] + " " + pair["chosen"] == CHOSEN
    assert pair["prompt"] + " " + pair["rejected"] == REJECTED


def test_split_hh_pair_conversational():
    pair = split_hh_pair(CHOSEN, REJECTED, conversational=True)
    assert pair == {
        "prompt": [
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke"},
        ],
        "chosen": [{"role": "assistant", "content": "Why did the chicken cross the road?"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    }


def test_hh_to_messages_full_transcript_and_pending_reply():
    assert hh_to_messages(REJECTED) == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "No."},
    ]
    # a trailing empty "Assistant:" turn is the generation prompt, not a message
    assert hh_to_messages("\n\nHuman: Hi\n\nAssistant:") == [{"role": "user", "content": "Hi"}]
    with pytest.raises(DataError, match=r"field 'transcript': expected a transcript of"):
        hh_to_messages("just some text")


@pytest.mark.parametrize(
    "chosen,rejected,message",
    [
        ("\n\nHuman: Hi", REJECTED, "field 'chosen': no '\\n\\nAssistant:' turn in the transcript"),
        (
            CHOSEN,
            "\n\nHuman: Hi there\n\nAssistant: Hey!\n\nHuman: Tell me a joke\n\nAssistant: No.",
            "field 'rejected': does not share the history of 'chosen' before the final Assistant turn "
            "(first difference at character 32)",
        ),
        (CHOSEN, HISTORY + "\n\nAssistant:  ", "field 'rejected': the final Assistant turn is empty"),
        (
            REJECTED,
            REJECTED,
            "field 'rejected': same final response as 'chosen'; a comparison needs two different responses",
        ),
    ],
)
def test_split_hh_pair_errors(chosen, rejected, message):
    with pytest.raises(DataError) as info:
        split_hh_pair(chosen, rejected)
    assert str(info.value) == message


def write_jsonl_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_run_converts_a_file_and_output_reads_as_comparisons(tmp_path, capsys):
    src = tmp_path / "hh.jsonl"
    write_jsonl_rows(src, [{"chosen": CHOSEN, "rejected": REJECTED, "extra": 1}] * 2)
    out = tmp_path / "out" / "pairs.jsonl"
    assert run(ConvertHHConfig(input=str(src), output=str(out))) == 0
    assert f"wrote 2 comparisons to {out} (0 invalid rows skipped)" in capsys.readouterr().out
    records = read_records(out, "comparison")
    assert records.rows == [{**split_hh_pair(CHOSEN, REJECTED), "strength": None}] * 2

    conv_out = tmp_path / "conv.jsonl"
    run(ConvertHHConfig(input=str(src), output=str(conv_out), conversational=True))
    first = read_records(conv_out, "comparison")[0]
    assert first["prompt"][-1] == {"role": "user", "content": "Tell me a joke"}
    assert (first["chosen"], first["rejected"]) == ("Why did the chicken cross the road?", "No.")


def test_run_bad_row_names_line_and_skip_invalid_counts(tmp_path, capsys):
    src = tmp_path / "hh.jsonl"
    write_jsonl_rows(
        src,
        [
            {"chosen": CHOSEN, "rejected": REJECTED},
            {"chosen": CHOSEN},
            {"chosen": "\n\nHuman: Hi", "rejected": REJECTED},
            {"chosen": CHOSEN, "rejected": REJECTED},
        ],
    )
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(DataError) as info:
        run(ConvertHHConfig(input=str(src), output=str(out)))
    assert str(info.value) == f"{src}:2: field 'rejected': missing"
    assert not out.exists()
    run(ConvertHHConfig(input=str(src), output=str(out), skip_invalid=True))
    assert f"wrote 2 comparisons to {out} (2 invalid rows skipped)" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 2


def test_cli_convert_hh(tmp_path, capsys):
    src = tmp_path / "hh.csv"
    src.write_text('chosen,rejected\n"' + CHOSEN + '","' + REJECTED + '"\n', encoding="utf-8")
    out = tmp_path / "pairs.jsonl"
    assert cli_main(["convert-hh", f"input={src}", f"output={out}", "--conversational"]) == 0
    assert read_records(out, "comparison")[0]["chosen"] == "Why did the chicken cross the road?"
    assert cli_main(["convert-hh", f"input={tmp_path / 'missing.jsonl'}", f"output={out}"]) == 2
    assert f"file not found: {tmp_path / 'missing.jsonl'}" in capsys.readouterr().err


def test_config_requires_input_and_rejects_unknown_keys():
    with pytest.raises(ConfigError) as info:
        load_config(ConvertHHConfig, None, ["output=y"])
    assert str(info.value) == "config key 'input' is required (expected str); set it in the YAML file or as input=..."
    with pytest.raises(ConfigError, match="^unknown config key 'conversation'"):
        load_config(ConvertHHConfig, None, ["input=x", "output=y", "conversation=true"])
    cfg = load_config(ConvertHHConfig, None, ["input=x", "output=y", "--skip-invalid"])
    assert (cfg.skip_invalid, cfg.conversational, cfg.split) == (True, False, None)
