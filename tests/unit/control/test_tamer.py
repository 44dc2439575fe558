"""TAMER (Knox & Stone 2009): credit assignment by hand-worked numbers, and learning a trivial task."""

import numpy as np
import pytest

from kilter.control.envs import EnvConfig
from kilter.control.tamer import (
    CreditWindow,
    SimulatedTrainer,
    TamerConfig,
    run_tamer,
    uniform_delay_credit,
    value_function,
)
from kilter.errors import ConfigError
from kilter.runs import read_metrics


def test_credit_of_a_step_is_the_delay_probability_mass_of_its_time_on_screen():
    # delay ~ U[0.2, 4.0] (density 1 / 3.8); a press at t = 1.0
    # step on screen [0, 0.5]: delays in [0.5, 1.0] -> 0.5 / 3.8 = 0.131579
    assert uniform_delay_credit(0.0, 0.5, 1.0, 0.2, 4.0) == pytest.approx(0.131579, abs=1e-6)
    # step on screen [0.5, 1.0]: delays in [0, 0.5], only [0.2, 0.5] possible -> 0.3 / 3.8 = 0.078947
    assert uniform_delay_credit(0.5, 1.0, 1.0, 0.2, 4.0) == pytest.approx(0.078947, abs=1e-6)
    # too recent (delay < 0.2) or too old (delay > 4) -> no credit
    assert uniform_delay_credit(0.9, 1.0, 1.0, 0.2, 4.0) == 0.0
    assert uniform_delay_credit(-5.0, -3.5, 1.0, 0.2, 4.0) == 0.0


def test_window_credits_sum_to_one_over_a_long_history_and_forget_old_steps():
    w = CreditWindow(0.2, 4.0)
    for k in range(40):
        w.add(np.zeros(2), 0, k * 0.25, (k + 1) * 0.25)
    credited = w.credits(10.0)
    assert sum(c for _, _, c in credited) == pytest.approx(1.0)
    assert len(w.steps) < 40  # steps older than the longest delay were dropped
    with pytest.raises(ConfigError):
        CreditWindow(1.0, 0.5)


def test_simulated_trainer_presses_from_the_true_advantage_late():
    cfg = TamerConfig(delay_steps=2)
    v = value_function(cfg)
    trainer = SimulatedTrainer(v, cfg, np.random.default_rng(0))
    s0, s1 = np.eye(8, dtype=np.float32)[0], np.eye(8, dtype=np.float32)[1]
    assert trainer.judge(s0, -1.0, s1, False) == 1.0  # right: δ = -1 + V(1) - V(0) = -1 - 6 + 7 = 0
    assert trainer.judge(s1, -1.0, s0, False) == -1.0  # left: δ = -1 - 7 + 6 = -2
    trainer.observe(5, s0, -1.0, s1, False)
    assert trainer.due(6) == [] and trainer.due(7) == [1.0]


def test_tamer_learns_the_corridor_from_the_simulated_trainer(tmp_path):
    cfg = TamerConfig(
        output_dir=str(tmp_path / "tamer"),
        episodes=15,
        delay_steps=2,
        feedback_prob=0.7,
        error_rate=0.1,
        env=EnvConfig(id="corridor", n_envs=1),
    )
    run_tamer(cfg)
    rows = read_metrics(tmp_path / "tamer")
    assert len(rows) == 15
    assert rows[0]["reward/true"] < -7  # an untrained Ĥ wanders
    # the last episodes walk straight to the goal: 7 steps, return -7 (optimal)
    assert [r["reward/true"] for r in rows[-3:]] == [-7.0, -7.0, -7.0]
    assert rows[-1]["feedback/presses"] > 0
    assert (tmp_path / "tamer" / "final" / "h_model.pt").is_file()


def test_tamer_needs_discrete_actions_and_a_value_function(tmp_path):
    with pytest.raises(ConfigError, match="discrete actions"):
        run_tamer(TamerConfig(output_dir=str(tmp_path), env=EnvConfig(id="pendulum", n_envs=1), critic=None))
    with pytest.raises(ConfigError, match="needs a value function"):
        value_function(TamerConfig(env=EnvConfig(id="cartpole", n_envs=1)))
