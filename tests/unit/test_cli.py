"""The `kilter` entry point: help text, and user mistakes as one stderr line with exit code 2."""

from __future__ import annotations

import re

import pytest

from kilter.cli import COMMANDS, _load, main
from kilter.config import describe_fields
from kilter.trainers.sft import SFTConfig


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_top_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, cmd in COMMANDS.items():
        assert re.search(rf"^\s+{re.escape(name)}\s+{re.escape(cmd.summary)}$", out, re.M), name
    assert main([]) == 0  # no arguments: the same help
    assert capsys.readouterr().out == out


def test_sft_help_documents_every_field(capsys):
    assert main(["sft", "--help"]) == 0
    out = capsys.readouterr().out
    flat = _squash(out)
    rows = describe_fields(SFTConfig)
    assert len(rows) > 40  # the nested sections (data, optim, lora) are flattened in
    for key, typ, default, doc in rows:
        assert doc, f"SFTConfig field {key} has no docstring"
        line = re.search(rf"^  {re.escape(key)}  \((.*)\)$", out, re.M)
        assert line, f"{key} missing from kilter sft --help"
        assert line.group(1) == f"{typ}, default {default}"
        assert _squash(doc) in flat, f"help text of {key} missing"
    for must in ("optim.lr", "data.packing", "lora.merge_on_save", "gradient_checkpointing", "resume"):
        assert f"  {must}  (" in out
    assert "(no description)" not in out


@pytest.mark.parametrize("name", [n for n, c in COMMANDS.items() if c.config])
def test_every_config_command_documents_every_field(name, capsys):
    assert main([name, "-h"]) == 0
    out = capsys.readouterr().out
    for key, _typ, default, doc in describe_fields(_load(COMMANDS[name].config)):
        assert doc, f"kilter {name}: field {key} has no docstring"
        shown = "required" if default == "required" else f"default {default}"
        assert f"  {key}  (" in out and f"{shown})" in out
        assert "PydanticUndefined" not in out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["sft", "optim.lr=abc"], "'optim.lr': expected float, got 'abc'"),
        (["sft", "batch_size=0"], "'batch_size'"),
        (["sft", "--optim.lrr", "1"], "unknown config key 'optim.lrr'"),
        (["sft", "--seed"], "--seed needs a value"),
        (["sft", "--config", "/nonexistent/kilter.yaml"], "config file not found: /nonexistent/kilter.yaml"),
        (["sft", "--config"], "--config needs a file path"),
        (["sft", "model=builtin:huge", "tensorboard=false"], "unknown built-in model 'huge'"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a mistake that slipped through must not write into the repo
    monkeypatch.delenv("KILTER_DEBUG", raising=False)
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("kilter sft: error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err + captured.out


def test_bad_yaml_through_the_cli(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("optim: {lr: [\n")
    assert main(["sft", f"--config={f}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not valid YAML" in err and str(f) in err


def test_unknown_command(capsys):
    assert main(["sfft"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'sfft'" in err and "sft" in err.split("commands:")[1]


def test_module_entry_point_runs_help():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "kilter", "sft", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    assert "  optim.lr  (float, default 0.0005)" in done.stdout
