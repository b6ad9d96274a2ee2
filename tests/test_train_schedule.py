"""Budget and learning-rate arithmetic: pure functions of the step number."""

import math

import pytest

from stages.lib.schedule import lr_at, session_end, time_for_another_step, total_steps


def test_budget_is_the_step_budget_or_epochs_rounded_up_to_whole_steps():
    assert total_steps(600, epochs=3, windows_per_epoch=1000, samples_per_step=16) == 600
    assert total_steps(0, epochs=1, windows_per_epoch=1000, samples_per_step=16) == 63  # 62.5 rounded up
    assert total_steps(0, epochs=2, windows_per_epoch=1000, samples_per_step=16) == 125
    assert total_steps(0, epochs=1, windows_per_epoch=3, samples_per_step=16) == 1


def test_session_stops_after_steps_today_and_never_past_the_budget():
    assert session_end(0, total=600, steps_today=0) == 600
    assert session_end(100, total=600, steps_today=50) == 150
    assert session_end(580, total=600, steps_today=50) == 600


def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr_at_the_last_step():
    lrs = [lr_at(s, total=100, lr=1.0, min_lr=0.1, warmup_steps=10) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_lr_depends_on_the_whole_budget_not_on_the_session():
    whole = [lr_at(s, 30, 3e-3, 3e-4, 5) for s in range(30)]
    sessions = [lr_at(s, 30, 3e-3, 3e-4, 5) for start, end in ((0, 7), (7, 19), (19, 30)) for s in range(start, end)]
    assert sessions == whole
    assert lr_at(0, total=1, lr=1.0, min_lr=0.0, warmup_steps=0) == 1.0


def test_time_check_reserves_room_for_a_step_and_the_closing_save():
    assert time_for_another_step(now=100, deadline=200, step_seconds=10, reserve_seconds=50)
    assert not time_for_another_step(now=150, deadline=200, step_seconds=10, reserve_seconds=50)
    assert not time_for_another_step(now=195, deadline=200, step_seconds=10, reserve_seconds=0)
