"""Configs: YAML + dotted overrides, and one-line errors naming the key and what was expected."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import Field

from kilter.config import BaseConfig, describe_fields, dump_config, load_config, parse_overrides
from kilter.errors import ConfigError
from kilter.trainers.sft import SFTConfig


class Inner(BaseConfig):
    """A nested section."""

    lr: float = Field(1e-3, gt=0)
    """Learning rate."""
    steps: int = 10
    """Steps."""


class Toy(BaseConfig):
    """A config with one of each kind of field."""

    name: str = "run"
    """A name."""
    size: int = Field(4, gt=0)
    """A positive size."""
    flag: bool = False
    """A switch."""
    mode: Literal["a", "b"] = "a"
    """A choice."""
    limit: int | None = None
    """Optional limit."""
    ids: list[int] | int = 0
    """A list or one number."""
    inner: Inner = Inner()
    """The section."""


# --------------------------------------------------------------------------- overrides


def test_parse_overrides_dotted_and_flag_forms():
    got = parse_overrides(["optim.lr=1e-4", "--seed", "3", "--lora.r=8", "--packing", "data.train=a/b.jsonl"])
    assert got == {"optim": {"lr": 1e-4}, "seed": 3, "lora": {"r": 8}, "packing": True, "data": {"train": "a/b.jsonl"}}
    assert isinstance(got["optim"]["lr"], float)  # YAML 1.1 would have left "1e-4" a string
    assert isinstance(got["seed"], int)


def test_parse_overrides_values_read_like_yaml():
    got = parse_overrides(["a=null", "b=[1, 2]", "c=false", "d=abc", "e=-3", "--f", "-1"])
    assert got == {"a": None, "b": [1, 2], "c": False, "d": "abc", "e": -3, "f": -1}


def test_dashes_in_flag_names_become_underscores():
    assert parse_overrides(["--group-by-length=false"]) == {"group_by_length": False}


def test_argument_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="'lr'"):
        parse_overrides(["lr"])


def test_bare_flag_on_non_boolean_field_is_an_error():
    # `--size` alone would otherwise become size=true, which pydantic reads as 1.
    with pytest.raises(ConfigError, match=r"--size needs a value: expected int"):
        load_config(Toy, None, ["--size"])
    assert load_config(Toy, None, ["--flag"]).flag is True


def test_yaml_then_overrides_precedence(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: from-yaml\nsize: 7\ninner:\n  lr: 0.5\n")
    cfg = load_config(Toy, f, ["inner.lr=0.25", "--mode", "b"])
    assert cfg.name == "from-yaml"  # YAML beats the default
    assert cfg.size == 7
    assert cfg.inner.lr == 0.25  # the override beats YAML
    assert cfg.inner.steps == 10  # a sibling the YAML section left out keeps its default
    assert cfg.mode == "b"
    assert load_config(Toy, f).inner.lr == 0.5


def test_numbers_are_accepted_for_string_fields():
    assert load_config(Toy, None, ["name=2024"]).name == "2024"


def test_empty_yaml_file_gives_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")
    assert load_config(Toy, f) == Toy()


def test_dump_config_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, ["optim.lr=3e-4", "data.packing=true", "lora.target_modules=[q_proj]"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_config(cfg))
    assert load_config(SFTConfig, f) == cfg


# --------------------------------------------------------------------------- errors


def _error(cls, overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_it_and_lists_known_keys():
    msg = _error(SFTConfig, ["optim.lrr=1"])
    assert "'optim.lrr'" in msg
    known = msg.split("known keys:")[1]
    assert [k.strip() for k in known.split(",")] == sorted(SFTConfig.model_fields["optim"].annotation.model_fields)
    top = _error(SFTConfig, ["bogus=1"])
    assert "'bogus'" in top and "batch_size" in top and "output_dir" in top


def test_wrong_type_names_key_and_expected_type():
    assert _error(SFTConfig, ["optim.lr=abc"]) == "config key 'optim.lr': expected float, got 'abc'"
    assert "'data.max_length': expected int" in _error(SFTConfig, ["data.max_length=x"])
    assert "'max_steps': expected int | null" in _error(SFTConfig, ["max_steps=abc"])
    assert "'resume': expected bool, got 'maybe'" in _error(SFTConfig, ["resume=maybe"])
    assert "'data': expected section" in _error(SFTConfig, ["data=5"])


def test_union_error_names_the_key_not_the_union_member():
    msg = _error(Toy, ["ids=abc"])
    assert msg.startswith("config key 'ids':"), msg
    assert "list of int | int" in msg


def test_out_of_range_and_bad_choice():
    msg = _error(SFTConfig, ["batch_size=0"])
    assert "'batch_size'" in msg and "greater than 0" in msg and "got 0" in msg
    msg = _error(SFTConfig, ["precision=fp64"])
    assert "'precision'" in msg and "'fp32'" in msg and "'bf16'" in msg


def test_error_mentions_the_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("batch_size: -1\n")
    msg = _error(SFTConfig, None, f)
    assert "'batch_size'" in msg and str(f) in msg


def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert _error(SFTConfig, None, missing) == f"config file not found: {missing}"


def test_bad_yaml_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("seed: 1\noptim:\n  lr: [1, 2\n")
    msg = _error(SFTConfig, None, f)
    assert str(f) in msg and "not valid YAML" in msg and "line " in msg


def test_yaml_must_be_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    assert "expected a mapping" in _error(SFTConfig, None, f)


# --------------------------------------------------------------------------- help rows


def test_describe_fields_flattens_sections():
    rows = {key: (typ, default, doc) for key, typ, default, doc in describe_fields(Toy)}
    assert rows["inner.lr"] == ("float", "0.001", "Learning rate.")
    assert rows["mode"] == ("'a' | 'b'", "'a'", "A choice.")
    assert rows["limit"] == ("int | null", "None", "Optional limit.")
    assert "inner" not in rows


def test_overriding_one_key_keeps_the_sections_documented_defaults():
    """PPO's optimizer defaults to a constant schedule without warmup: setting optim.lr must not
    silently bring back OptimConfig's class defaults (cosine, 5% warmup)."""
    from kilter.trainers.ppo import PPOConfig

    cfg = load_config(PPOConfig, overrides=["optim.lr=3e-3", "value.optim.lr=1e-3"])
    assert cfg.optim.lr == 3e-3 and cfg.optim.schedule == "constant" and cfg.optim.warmup_ratio == 0.0
    assert cfg.value.optim.lr == 1e-3 and cfg.value.optim.schedule == "constant"
    assert load_config(PPOConfig, overrides=["optim.schedule=cosine"]).optim.lr == 1e-5
class NeedsInput(BaseConfig):
    """A command with a key that has no default."""

    input: str
    """The file to read."""
    n: int = 1
    """How many."""


def test_missing_required_key_says_required():
    with pytest.raises(ConfigError) as info:
        load_config(NeedsInput, overrides=["n=2"])
    assert str(info.value) == "config key 'input' is required (expected str); set it in the YAML file or as input=..."
    rows = {key: default for key, _typ, default, _doc in describe_fields(NeedsInput)}
    assert rows == {"input": "required", "n": "1"}
