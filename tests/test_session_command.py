"""The session command's parts that need no training: params.yaml edited in place, which changes are DVC's, the
push speed remembered, and what a failed step says (the whole day runs in test_daily_session.py)."""

import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
from dvc_helpers import REPO

from stages import session as command
from stages.lib.base.params import load_params
from stages.lib.daily import workspace as ws


def test_train_values_are_set_in_place_with_comments_and_alignment_kept():
    text = (REPO / "params.yaml").read_text()
    updated = ws.set_train_values(text, {"steps_today": 1000, "minutes_today": "auto"})
    changed = [(a, b) for a, b in zip(text.splitlines(), updated.splitlines()) if a != b]
    assert changed == [
        ("  steps_today: 0                # steps in this session; 0: until the budget is spent",
         "  steps_today: 1000             # steps in this session; 0: until the budget is spent"),
        ("  minutes_today: 0              # wall-clock limit for this session; 0: none; auto: the machine's (SLURM, "
         "Kaggle, Colab)",
         "  minutes_today: auto           # wall-clock limit for this session; 0: none; auto: the machine's (SLURM, "
         "Kaggle, Colab)")]
    assert ws.set_train_values("train:\n  lr: 0.1\nevaluate:\n  batch_size: 2\n", {"steps_today": 5}) == (
        "train:\n  steps_today: 5\n  lr: 0.1\nevaluate:\n  batch_size: 2\n")  # a missing key goes into train
    assert ws.set_train_values("render:\n  format: auto\n", {"steps_today": 5}) == (
        "render:\n  format: auto\ntrain:\n  steps_today: 5\n")


def test_dvc_outputs_are_told_from_the_users_changes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    outputs = ws.pipeline_outputs()
    assert {"data/rendered/stats.json", "checkpoints", "outputs/live", "outputs/eval/metrics.json",
            "models/sample-arith"} <= set(outputs)  # ${train.checkpoint_dir}, ${train.model_name}... filled in
    log = "outputs/sessions.jsonl"
    for theirs in ("dvc.lock", "outputs/eval/metrics.json", "data/rendered/stats.json", "data/tokens/.gitignore",
                   log):
        assert ws.belongs_to_dvc(theirs, outputs, log), theirs
    for mine in ("params.yaml", "stages/train.py", "README.md", "dvc.yaml", "outputs/notes.txt"):
        assert not ws.belongs_to_dvc(mine, outputs, log), mine


def test_params_changed_only_in_the_values_the_command_sets_are_the_commands(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  lr: 0.1\n  steps_today: 0\n")
    for git in (["git", "init", "-q"], ["git", "add", "params.yaml"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@e", "commit", "-q", "-m", "p"]):
        subprocess.run(git, check=True)
    ws.write_train_values({"steps_today": 50, "minutes_today": "auto"})  # left by an interrupted session
    assert ws.only_session_values_changed()
    params.write_text(params.read_text().replace("lr: 0.1", "lr: 0.2"))
    assert not ws.only_session_values_changed()


def test_the_last_measured_push_speed_is_remembered_in_the_sessions_log(tmp_path):
    log = tmp_path / "sessions.jsonl"
    assert ws.last_push_speed(ws.read_sessions(log)) is None
    ws.append_session(log, {"session": 1, "push": {"bytes": 8_000_000, "seconds": 2.0}})
    ws.append_session(log, {"session": 2, "push": None})  # nothing trained, nothing measured
    assert [r["session"] for r in ws.read_sessions(log)] == [1, 2]
    assert ws.last_push_speed(ws.read_sessions(log)) == 4_000_000


def fake_commands(monkeypatch, failing: str, calls: list):
    """git and dvc stand-ins: every command succeeds except those starting with `failing`."""
    def sh(*args, env=None, quiet=False, shown=""):
        calls.append(" ".join(args))
        return subprocess.CompletedProcess(args, 1 if " ".join(args).startswith(failing) else 0, "", "")
    monkeypatch.setattr(ws, "sh", sh)
    monkeypatch.setattr(ws, "output_of", lambda *args: "1")
    monkeypatch.setattr(ws, "changed_files", lambda untracked=False: ["dvc.lock", "outputs/eval/metrics.json"])


def a_day_after_training(tmp_path, monkeypatch) -> command.Day:
    monkeypatch.chdir(REPO)
    day = command.Day(Namespace(steps=2, minutes=None))
    day.params, day.log, day.remote, day.upstream = load_params(), tmp_path / "sessions.jsonl", "storage", "origin/main"
    day.before, day.after, day.seconds = ({"step": 2, "total": 8, "bytes": 10, "losses": {}},
                                          {"step": 4, "total": 8, "bytes": 10, "losses": {}}, 3.0)
    return day


def test_a_failed_data_push_leaves_the_commit_undone_and_says_how_to_finish(tmp_path, monkeypatch):
    calls = []
    fake_commands(monkeypatch, "dvc push", calls)
    day = a_day_after_training(tmp_path, monkeypatch)
    with pytest.raises(command.StepFailed, match=r"dvc push failed \(see above\): the session trained, but nothing is "
                       r"committed or pushed\. To finish by hand: dvc push && git add -- dvc\.lock "
                       r"outputs/eval/metrics\.json && git commit -m 'Session: steps 2 -> 4' && git push"):
        day.push_data()
    assert calls == ["dvc push"] and not Path(day.log).exists()


def test_a_failed_git_push_says_the_session_is_safe_here(tmp_path, monkeypatch):
    calls = []
    fake_commands(monkeypatch, "git push", calls)
    day = a_day_after_training(tmp_path, monkeypatch)
    with pytest.raises(command.StepFailed, match=r"the session is committed here and its data is pushed\. To finish "
                       r"by hand: git pull --rebase && git push"):
        day.push_commit()


def test_arguments_are_checked():
    assert command._parse_args(["--steps", "10", "--minutes", "auto"]) == Namespace(steps=10, minutes="auto")
    assert command._parse_args(["--minutes", "90"]).minutes == 90.0
    with pytest.raises(SystemExit):
        command._parse_args(["--minutes", "soon"])
