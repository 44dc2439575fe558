"""Every preset under configs/<command>/ loads with that command's config class.

New presets are picked up automatically: the folder name is the command, looked up in
``kilter.cli.COMMANDS``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kilter.cli import COMMANDS, _load
from kilter.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p for p in CONFIGS.glob("*/*") if p.suffix in (".yaml", ".yml"))


def test_presets_exist():
    assert (CONFIGS / "sft" / "tiny.yaml") in PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=[f"{p.parent.name}/{p.name}" for p in PRESETS])
def test_preset_loads_with_its_command_config(path):
    command = COMMANDS.get(path.parent.name)
    assert command is not None, f"configs/{path.parent.name}/ is not named after a command in kilter.cli.COMMANDS"
    assert command.config, f"kilter {path.parent.name} parses its own arguments; it takes no config file"
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and raw, f"{path} is empty"
    cfg = load_config(_load(command.config), path)
    # every key the file sets reached the config (none were silently dropped)
    dumped = cfg.model_dump()
    for key, value in raw.items():
        assert key in dumped, key
        if not isinstance(value, dict):
            assert dumped[key] == value or isinstance(dumped[key], tuple), (key, dumped[key], value)

