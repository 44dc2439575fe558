"""Every preset under configs/dpo, configs/kto and configs/bon loads into its config class."""

from __future__ import annotations

from pathlib import Path

import pytest

from kilter.commands.bon import BonConfig
from kilter.config import load_config
from kilter.trainers.dpo import DPOConfig
from kilter.trainers.kto import KTOConfig

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
CLASSES = {"dpo": DPOConfig, "kto": KTOConfig, "bon": BonConfig}
PRESETS = sorted((name, p) for name in CLASSES for p in (CONFIGS / name).glob("*.yaml"))


def test_each_command_has_a_tiny_and_a_smollm2_preset():
    for name in CLASSES:
        stems = {p.stem for n, p in PRESETS if n == name}
        assert "tiny" in stems and any(s.startswith("smollm2-135m") for s in stems), name


@pytest.mark.parametrize("name, path", PRESETS, ids=[f"{n}/{p.name}" for n, p in PRESETS])
def test_preset_loads(name, path):
    cfg = load_config(CLASSES[name], path)
    if name == "bon":
        assert (cfg.reward_fn is None) != (cfg.reward_model is None)
        return
    if name == "dpo":
        assert not (cfg.loss_type == "ipo" and cfg.label_smoothing > 0)  # run() refuses that pair
    if "smollm2" in path.stem:
        assert cfg.lora.enabled and cfg.model == "smollm2-135m"
