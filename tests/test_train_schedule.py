"""Budget and learning-rate arithmetic: pure functions of the step number."""

import math

import pytest

from stages.lib.training.schedule import Schedule, agrees_until, session_end, time_for_another_step, total_steps


def cosine(total, lr=1.0, min_lr=0.1, warmup=10):
    return Schedule.planned("cosine", total, lr, min_lr, warmup)


def wsd(total, decay_steps=0, decay_fraction=0.2, lr=1.0, min_lr=0.1, warmup=10):
    return Schedule.planned("wsd", total, lr, min_lr, warmup, decay_steps, decay_fraction)


def test_budget_is_the_step_budget_or_epochs_rounded_up_to_whole_steps():
    assert total_steps(600, epochs=3, windows_per_epoch=1000, samples_per_step=16) == 600
    assert total_steps(0, epochs=1, windows_per_epoch=1000, samples_per_step=16) == 63  # 62.5 rounded up
    assert total_steps(0, epochs=2, windows_per_epoch=1000, samples_per_step=16) == 125
    assert total_steps(0, epochs=1, windows_per_epoch=3, samples_per_step=16) == 1


def test_session_stops_after_steps_today_and_never_past_the_budget():
    assert session_end(0, total=600, steps_today=0) == 600
    assert session_end(100, total=600, steps_today=50) == 150
    assert session_end(580, total=600, steps_today=50) == 600


def test_cosine_warms_up_linearly_then_decays_to_min_lr_at_the_last_step():
    lrs = [cosine(100).lr_at(s) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 89)))


def test_lr_depends_on_the_whole_budget_not_on_the_session():
    schedule = Schedule.planned("cosine", 30, 3e-3, 3e-4, 5)
    whole = [schedule.lr_at(s) for s in range(30)]
    sessions = [schedule.lr_at(s) for start, end in ((0, 7), (7, 19), (19, 30)) for s in range(start, end)]
    assert sessions == whole
    assert Schedule.planned("cosine", 1, 1.0, 0.0, 0).lr_at(0) == 1.0


def test_wsd_holds_the_rate_then_decays_linearly_over_the_last_steps_to_min_lr():
    schedule = wsd(100, decay_steps=20)
    lrs = [schedule.lr_at(s) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10:80] == [1.0] * 70
    assert lrs[80] == pytest.approx(1.0 - 0.9 / 20) and lrs[-1] == pytest.approx(0.1)
    assert lrs[80:] == pytest.approx([1.0 - 0.9 * (s - 79) / 20 for s in range(80, 100)])
    assert schedule.decay_start == schedule.pre_decay_step == 80
    assert wsd(100, decay_fraction=0.3).decay_start == 70  # 30% of the run
    assert wsd(10, decay_steps=50, warmup=4).decay_start == 4  # never inside the warmup
    assert cosine(100).pre_decay_step is None


def test_how_far_two_schedules_agree_decides_what_an_extension_keeps():
    assert agrees_until(wsd(100, 20), wsd(100, 20)) == math.inf
    assert agrees_until(wsd(100, 20), wsd(200, 20)) == 80  # both stable until the shorter one decays
    assert agrees_until(wsd(100), wsd(200)) == 80  # a decay fraction: 20 of 100, 40 of 200
    assert agrees_until(cosine(100), cosine(200)) == 10  # only the warmup is the same
    assert agrees_until(cosine(100), wsd(100)) == 10
    old, new = wsd(100, 20), wsd(200, 20)
    assert [old.lr_at(s) for s in range(80)] == [new.lr_at(s) for s in range(80)]
    assert old.lr_at(80) != new.lr_at(80)


def test_a_replanned_schedule_starts_where_the_rate_was_and_keeps_its_shape():
    old = cosine(100)
    longer = cosine(200).replanned(60, old.lr_at(60), old.stable_steps)
    assert longer.lr_at(60) == old.lr_at(60)  # no jump at the re-plan
    assert longer.lr_at(199) == pytest.approx(0.1)
    span = 200 - 1 - 60
    assert longer.lr_at(130) == pytest.approx(0.1 + 0.5 * (1 + math.cos(math.pi * 70 / span)) * (old.lr_at(60) - 0.1))
    finished = cosine(200).replanned(100, old.lr_at(100), old.stable_steps)
    assert [finished.lr_at(s) for s in range(100, 200)] == pytest.approx([0.1] * 100)  # a finished cosine: min_lr
    held = wsd(200, 20).replanned(90, 0.5, 80)
    assert held.lr_at(90) == held.lr_at(179) == 0.5 and held.lr_at(199) == pytest.approx(0.1)
    assert held.stable_steps == 80
    assert Schedule.from_json(held.as_json()) == held


def test_time_check_reserves_room_for_a_step_and_the_closing_save():
    assert time_for_another_step(now=100, deadline=200, step_seconds=10, reserve_seconds=50)
    assert not time_for_another_step(now=150, deadline=200, step_seconds=10, reserve_seconds=50)
    assert not time_for_another_step(now=195, deadline=200, step_seconds=10, reserve_seconds=0)
