"""The early-stop rule: patience diverging evaluations (proxy up, truth down) in a row."""

import pytest

from kilter.evaluation.overoptimization import OveroptimisationMonitor


def test_the_worked_example_stops_at_the_second_divergence():
    m = OveroptimisationMonitor(patience=2)
    assert [m.update(p, t) for p, t in [(1, 0.5), (2, 0.4), (3, 0.3)]] == [False, False, True]


def test_a_recovery_resets_the_streak_and_equal_values_do_not_count():
    m = OveroptimisationMonitor(patience=2)
    seq = [(1, 0.5), (2, 0.4), (3, 0.45), (4, 0.4), (4, 0.3), (5, 0.3), (6, 0.2), (7, 0.1)]
    # 2: diverges (1); 3: truth rose (0); 4: diverges (1); proxy flat (0); truth flat (0); 6: (1); 7: (2) -> stop
    assert [m.update(p, t) for p, t in seq] == [False, False, False, False, False, False, False, True]


def test_patience_one_and_bad_patience():
    m = OveroptimisationMonitor(patience=1)
    assert m.update(1.0, 1.0) is False and m.update(2.0, 0.0) is True
    with pytest.raises(ValueError, match="patience"):
        OveroptimisationMonitor(patience=0)
