"""The synthetic labeler: true-reward preferences with B-Pref style noise, equal and can't-tell answers."""

import numpy as np
import pytest

from kilter.control.labelers import LabelerConfig, SyntheticLabeler
from kilter.control.segments import Segment


def seg(rewards) -> Segment:
    r = np.asarray(rewards, dtype=np.float64)
    return Segment(obs=np.zeros((len(r), 1), np.float32), acts=np.zeros(len(r), np.int64), true_rewards=r)


def answers(cfg: LabelerConfig, a: Segment, b: Segment, n: int = 2000) -> list[str]:
    rng = np.random.default_rng(0)
    return SyntheticLabeler(cfg).label([(a, b)] * n, rng)


def test_perfect_labeler_prefers_the_higher_true_return():
    lab = SyntheticLabeler(LabelerConfig())
    rng = np.random.default_rng(0)
    assert lab.answer(seg([1, 1, 1]), seg([1, 0, 1]), rng) == "left"
    assert lab.answer(seg([0, 0, 0]), seg([0, 0, 1]), rng) == "right"
    assert lab.answer(seg([1, 0]), seg([0, 1]), rng) == "equal"


def test_equal_margin_and_cant_tell():
    assert set(answers(LabelerConfig(equal_margin=0.5), seg([1.0]), seg([0.6]), 10)) == {"equal"}
    assert set(answers(LabelerConfig(cant_tell_prob=1.0), seg([5.0]), seg([0.0]), 10)) == {"cant_tell"}
    skip = LabelerConfig(skip_below=0.0)
    assert set(answers(skip, seg([-1.0]), seg([-2.0]), 10)) == {"cant_tell"}
    assert set(answers(skip, seg([1.0]), seg([-2.0]), 10)) == {"left"}


def test_mistakes_flip_the_stated_fraction():
    out = answers(LabelerConfig(error_rate=0.2), seg([1.0]), seg([0.0]))
    assert out.count("right") / len(out) == pytest.approx(0.2, abs=0.03)


def test_boltzmann_rationality():
    # P(left) = sigmoid(beta (R1 - R2)) = sigmoid(1) = 0.731
    out = answers(LabelerConfig(beta=1.0), seg([1.0]), seg([0.0]))
    assert out.count("left") / len(out) == pytest.approx(0.731, abs=0.03)


def test_myopic_labeler_weighs_recent_steps_more():
    early, late = seg([1.0, 0.0, 0.0]), seg([0.0, 0.0, 0.9])
    rng = np.random.default_rng(0)
    assert SyntheticLabeler(LabelerConfig()).answer(early, late, rng) == "left"
    assert SyntheticLabeler(LabelerConfig(myopia=0.5)).answer(early, late, rng) == "right"  # 0.25 vs 0.9
