"""`kilter ppo` configuration: bad settings fail early with one clear line."""

import pytest

from kilter.cli import main
from kilter.config import load_config
from kilter.errors import ConfigError
from kilter.trainers.ppo import PPOConfig, check_config

GOLD = ["reward.function=builtin:gold"]


def _cfg(*overrides: str) -> PPOConfig:
    return load_config(PPOConfig, None, list(overrides))


@pytest.mark.parametrize("overrides, message", [
    (["rollout.batch_size=10", "update.num_minibatches=4", *GOLD],
     "update.num_minibatches=4 does not divide the rollout batch of 10 responses"),
    (["rollout.batch_size=8", "rollout.samples_per_prompt=3", "update.num_minibatches=5", *GOLD],
     "does not divide the rollout batch of 24 responses"),
    (["rollout.batch_size=8", "update.num_minibatches=2", "update.grad_accum=3", *GOLD],
     "update.grad_accum=3 does not divide the minibatch of 4 responses"),
    ([], "no reward source: set reward.model"),
    (["algorithm=rloo", *GOLD], "rollout.samples_per_prompt >= 2"),
    (["algorithm=grpo", "rollout.samples_per_prompt=1", *GOLD], "rollout.samples_per_prompt >= 2"),
    (["lora.enabled=true", "lora.dropout=0.1", *GOLD], "lora.dropout must be 0"),
    (["ptx.coef=0.5", *GOLD], "ptx.coef > 0 needs ptx.data"),
])
def test_cross_field_errors(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_config(_cfg(*overrides))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, key", [
    ("rollout.temperature=0", "rollout.temperature"),
    ("rollout.temperature=-0.5", "rollout.temperature"),
    ("algorithm=dpo", "algorithm"),
    ("kl.estimator=k9", "kl.estimator"),
    ("rollout.top_p=1.5", "rollout.top_p"),
])
def test_field_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        _cfg(override, *GOLD)


def test_good_configs_pass():
    check_config(_cfg(*GOLD))
    check_config(_cfg("algorithm=rloo", "rollout.samples_per_prompt=4", "rollout.batch_size=16", *GOLD))
    cfg = _cfg("rollout.batch_size=8", "rollout.samples_per_prompt=2", *GOLD)
    assert cfg.rollout_size == 16
    assert cfg.sampling().temperature == 1.0 and cfg.sampling().do_sample


def test_cli_prints_one_line_and_exits_2(tmp_path, capsys):
    code = main(["ppo", f"output_dir={tmp_path / 'run'}", "rollout.temperature=0", *GOLD])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "rollout.temperature" in err and "greater than 0" in err
    code = main(["ppo", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no reward source" in err and err.count("\n") == 0
    assert not (tmp_path / "run").exists()  # nothing is written before the config is known to be good
    code = main(["ppo", f"output_dir={tmp_path / 'run'}", "reward.function=kilter_no_such_module:f"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot import module kilter_no_such_module" in err and err.count("\n") == 0
    assert not (tmp_path / "run").exists()


def test_help_lists_every_section(capsys):
    assert main(["ppo", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("algorithm", "rollout.temperature", "kl.estimator", "update.num_minibatches", "reward.model",
                "value.model", "ptx.coef", "baseline.kind", "freeze_layers"):
        assert key in text


def test_every_preset_loads_and_passes_the_checks():
    from pathlib import Path

    presets = sorted((Path(__file__).parents[3] / "configs" / "ppo").glob("*.yaml"))
    assert {p.name for p in presets} >= {"tiny-gold.yaml", "tiny-rm.yaml", "smollm2-135m-lora.yaml"}
    for path in presets:
        cfg = load_config(PPOConfig, path, [])
        check_config(cfg)
        assert cfg.reward.all_sources(), path.name


def test_kl_estimator_and_whitening_defaults_follow_the_algorithm():
    from kilter.trainers.ppo import PPOConfig

    assert PPOConfig().kl_estimator == "k1" and PPOConfig().whitens
    grpo = PPOConfig(algorithm="grpo", rollout={"samples_per_prompt": 4}, reward={"function": "builtin:gold"})
    assert grpo.kl_estimator == "k3"  # GRPO's loss term (Shao et al. 2024, eq. 3)
    assert not grpo.whitens  # the group std already scales its advantages
    assert PPOConfig(algorithm="grpo", update={"whiten_advantages": True}).whitens  # unless asked


def test_grpo_refuses_a_kl_penalty_inside_the_standardised_reward():
    from kilter.trainers.ppo import PPOConfig, check_config

    cfg = PPOConfig(algorithm="grpo", rollout={"samples_per_prompt": 4, "batch_size": 4},
                    update={"num_minibatches": 1}, reward={"function": "builtin:gold"}, kl={"estimator": "k1"})
    with pytest.raises(ConfigError, match="kl.estimator=k3"):
        check_config(cfg)


def test_ipo_averages_log_probs_per_token_by_default():
    from kilter.trainers.dpo import DPOConfig

    assert DPOConfig(loss_type="ipo").averages_logps
    assert not DPOConfig().averages_logps
    assert not DPOConfig(loss_type="ipo", average_logps=False).averages_logps
