"""kilter distill: presets load, the context is read and placed, bad input is one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from kilter.config import load_config
from kilter.data.context import load_context as _load_context
from kilter.data.context import with_context
from kilter.errors import ConfigError, DataError
from kilter.trainers.distill import DistillConfig


def load_context(cfg: DistillConfig):
    return _load_context(cfg.context, cfg.context_file)

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "distill"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_preset_loads_and_its_context_file_exists(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parents[1])  # presets name their context relative to the repository root
    cfg = load_config(DistillConfig, path)
    assert load_context(cfg)  # a non-empty context
    if "smollm2" in path.stem:
        assert cfg.lora.enabled and cfg.model == "smollm2-135m" and cfg.teacher_model is None


def test_the_teacher_is_load_policys_reference():
    cfg = load_config(DistillConfig, None, ["context=x", "teacher_model=runs/big/final"])
    assert cfg.ref_model == "runs/big/final"
    assert load_config(DistillConfig, None, ["context=x"]).ref_model is None


def test_exactly_one_context_source(tmp_path):
    with pytest.raises(ConfigError, match="exactly one"):
        load_context(load_config(DistillConfig, None, []))
    with pytest.raises(ConfigError, match="exactly one"):
        load_context(load_config(DistillConfig, None, ["context=a", f"context_file={tmp_path / 'c.txt'}"]))
    with pytest.raises(ConfigError, match="no such file"):
        load_context(load_config(DistillConfig, None, [f"context_file={tmp_path / 'missing.txt'}"]))


def test_context_files(tmp_path):
    text = tmp_path / "c.txt"
    text.write_text("Be kind.\n")
    assert load_context(load_config(DistillConfig, None, [f"context_file={text}"])) == "Be kind.\n"
    messages = tmp_path / "c.json"
    messages.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]')
    assert load_context(load_config(DistillConfig, None, [f"context_file={messages}"]))[1]["content"] == "Hello!"
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user"}]')
    with pytest.raises(DataError, match="role, content"):
        load_context(load_config(DistillConfig, None, [f"context_file={bad}"]))
    broken = tmp_path / "broken.json"
    broken.write_text("[1,")
    with pytest.raises(DataError, match="not valid JSON"):
        load_context(load_config(DistillConfig, None, [f"context_file={broken}"]))


def test_with_context_places_the_context():
    assert with_context("", "Review the lamp.") == "Review the lamp."  # empty: the student's own prompt
    assert with_context("Be warm.\n", "Review the lamp.") == "Be warm.\nReview the lamp."
    chat = [{"role": "user", "content": "Review the lamp."}]
    assert with_context("Be warm.", chat) == [{"role": "system", "content": "Be warm."}] + chat
    system = [{"role": "system", "content": "You are terse."}] + chat
    assert with_context("Be warm.", system)[0] == {"role": "system", "content": "Be warm.\n\nYou are terse."}
    shots = [{"role": "user", "content": "Review the mug."}, {"role": "assistant", "content": "Lovely mug!"}]
    assert with_context(shots, chat) == shots + chat
    with pytest.raises(DataError, match="conversational"):
        with_context(shots, "Review the lamp.")


def test_bad_values_are_config_errors():
    with pytest.raises(ConfigError, match="kl"):
        load_config(DistillConfig, None, ["context=x", "kl=sideways"])
    with pytest.raises(ConfigError, match="top_k"):
        load_config(DistillConfig, None, ["context=x", "top_k=0"])


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from kilter.cli import main

    base = ["distill", f"output_dir={tmp_path / 'run'}", "tensorboard=false", "threads=1"]
    for extra, message in (([], "exactly one of context"),
                           ([f"context_file={tmp_path / 'nope.txt'}"], "no such file"),
                           (["context=x", "data.continuations=maybe"], "data.continuations")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and message in err.strip().splitlines()[-1], err
