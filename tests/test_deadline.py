"""train.minutes_today: auto: the machine's time limit found by itself, in faked environments, and the time kept
back for the save and the push."""

import os
import time
from datetime import datetime, timezone

import pytest
from train_helpers import checkpoint_step, make_workspace, session

from stages.lib.base.errors import UserError
from stages.lib.training.deadline import (
    COMMIT_SPEED_ENV,
    KEEP_BACK_ENV,
    PUSH_SPEED_ENV,
    STARTED_ENV,
    find_time_limit,
    parse_slurm_duration,
    session_minutes,
)

NOW = 1_800_000_000.0
TICKS = os.sysconf("SC_CLK_TCK")


def fake_proc(tmp_path, uptime: float, pid1_started_after_boot: float):
    """A /proc with just what machine_age reads: the uptime and PID 1's start (its command name has a space)."""
    (tmp_path / "1").mkdir()
    (tmp_path / "uptime").write_text(f"{uptime} 123.0\n")
    fields = ["S"] + ["0"] * 18 + [str(int(pid1_started_after_boot * TICKS))] + ["0"] * 30
    (tmp_path / "1" / "stat").write_text(f"1 (my init) {' '.join(fields)}\n")
    return tmp_path


def test_an_explicit_deadline_wins_over_everything_else():
    env = {"STEPWISE_DEADLINE": str(NOW + 600), "SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": str(NOW + 60)}
    limit = find_time_limit(env, NOW)
    assert (limit.ends_at, limit.source) == (NOW + 600, "STEPWISE_DEADLINE")
    local = datetime(2027, 1, 15, 18, 30)
    assert find_time_limit({"STEPWISE_DEADLINE": "2027-01-15T18:30"}, NOW).ends_at == local.timestamp()
    utc = datetime(2027, 1, 15, 17, 30, tzinfo=timezone.utc).timestamp()
    assert find_time_limit({"STEPWISE_DEADLINE": "2027-01-15T18:30:00+01:00"}, NOW).ends_at == utc
    with pytest.raises(UserError, match=r"STEPWISE_DEADLINE = 'tonight' is not a time; expected Unix seconds"):
        find_time_limit({"STEPWISE_DEADLINE": "tonight"}, NOW)


def test_slurm_end_time_from_the_environment_or_from_squeue():
    limit = find_time_limit({"SLURM_JOB_ID": "42", "SLURM_JOB_END_TIME": str(int(NOW) + 3600)}, NOW)
    assert (limit.ends_at, limit.source) == (NOW + 3600, "SLURM job 42 (SLURM_JOB_END_TIME)")
    asked = []
    limit = find_time_limit({"SLURM_JOB_ID": "42"}, NOW, squeue=lambda job: asked.append(job) or "1-02:03:04\n")
    assert asked == ["42"] and limit.ends_at == NOW + 93784 and "squeue: 26 h 03 min left" in limit.source
    assert find_time_limit({"SLURM_JOB_ID": "42"}, NOW, squeue=lambda job: "UNLIMITED") is None
    assert find_time_limit({"SLURM_JOB_ID": "42"}, NOW, squeue=lambda job: None) is None  # no squeue here


def test_slurm_durations():
    assert parse_slurm_duration("58:20") == 3500
    assert parse_slurm_duration("3:00:00") == 10800
    assert parse_slurm_duration("2-00:00:01") == 172801
    for no_limit in ("UNLIMITED", "NOT_SET", "INVALID", ""):
        assert parse_slurm_duration(no_limit) is None


def test_the_squeue_command_is_asked_for_the_time_left(tmp_path, monkeypatch):
    fake = tmp_path / "squeue"
    fake.write_text('#!/bin/sh\n[ "$*" = "-h -j 42 -o %L" ] && echo "1:30:00"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert find_time_limit({"SLURM_JOB_ID": "42"}, NOW).ends_at == NOW + 5400


@pytest.mark.parametrize("env, name", [({"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, "Kaggle session"),
                                       ({"COLAB_RELEASE_TAG": "release-colab_20260101"}, "Colab VM"),
                                       ({"COLAB_GPU": "1"}, "Colab VM")])
def test_notebook_sessions_last_at_most_12_hours_from_the_machine_start(tmp_path, env, name):
    proc = fake_proc(tmp_path, uptime=5000.0, pid1_started_after_boot=1000.0)  # started 4000 s ago
    limit = find_time_limit(env, NOW, proc=proc)
    assert limit.ends_at == pytest.approx(NOW - 4000 + 12 * 3600, abs=1)
    assert limit.source.startswith(f"{name} (at most 12 h from its start at ")


def test_no_known_machine_means_no_limit():
    assert find_time_limit({"HOME": "/root"}, NOW) is None
    minutes, note = session_minutes("auto", 1e6, env={}, now=NOW)
    assert minutes == 0 and "no time limit found" in note


def test_the_push_is_kept_back_from_the_limit_under_the_session_command():
    env = {"STEPWISE_DEADLINE": str(NOW + 1800), PUSH_SPEED_ENV: "1000000"}
    minutes, note = session_minutes("auto", 60e6, elapsed=30, env=env, now=NOW)
    assert minutes == pytest.approx((1800 + 30 - 60) / 60)  # counted from the stage's start, 30 s ago
    assert note.startswith("time limit: STEPWISE_DEADLINE: ends at ")
    assert "keeping 60 s back to push about 60.0 MB: training for at most 29 min" in note
    assert session_minutes(45, 60e6, env=env, now=NOW)[0] == pytest.approx(44)
    assert session_minutes(45, 60e6, env={}, now=NOW) == (45, None)  # not under the session command
    assert session_minutes(0, 60e6, env=env, now=NOW) == (0, None)  # no limit asked
    assert session_minutes("auto", 60e6, env={**env, "STEPWISE_DEADLINE": str(NOW + 10)}, now=NOW)[0] > 0


def test_an_auto_session_stops_in_time_for_its_push(tmp_path, monkeypatch, capsys):
    root = make_workspace(tmp_path)
    began = time.time()
    monkeypatch.setenv("STEPWISE_DEADLINE", str(began + 16))
    # Before any checkpoint exists a push is taken to be 16 bytes per parameter: 34,976 parameters -> 560 kB.
    monkeypatch.setenv(PUSH_SPEED_ENV, str(16 * 34_976 / 6))  # 6 s to push
    result = session(root, minutes_today="auto", total_step_budget=100_000, eval_every=100_000, save_every=100_000)
    assert result.stopped_by == "time" and 0 < result.end_step == checkpoint_step(root)
    assert time.time() - began < 16 - 6 + 1  # the push's 6 s left (1 s of slack for a busy machine)
    out = capsys.readouterr().out
    assert "time limit: STEPWISE_DEADLINE: ends at" in out and "keeping 6 s back to push about 0.6 MB" in out


def test_under_the_session_command_minutes_count_from_its_start_and_dvcs_commit_is_kept_back():
    env = {PUSH_SPEED_ENV: "1000000", COMMIT_SPEED_ENV: "2000000", KEEP_BACK_ENV: "50", STARTED_ENV: str(NOW - 100)}
    # The stage started 40 s ago, 60 s after the command: 10 min - 60 s (push) - 30 s (DVC's commit) - 50 s - 60 s.
    minutes, note = session_minutes(10, 60e6, elapsed=40, env=env, now=NOW)
    assert minutes == pytest.approx((600 - 60 - 30 - 50 - 60) / 60)
    assert "keeping 60 s back to push about 60.0 MB, and 80 s back for DVC's commit and what follows it" in note
    assert "60 s of it spent before the train stage started" in note
    env["STEPWISE_DEADLINE"] = str(NOW + 1000)  # auto: the machine's end, wherever the command started
    assert session_minutes("auto", 60e6, elapsed=40, env=env, now=NOW)[0] == pytest.approx((1000 + 40 - 140) / 60)
