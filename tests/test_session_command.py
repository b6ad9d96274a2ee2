"""The session command's parts that need no training: params.yaml edited in place, which changes are DVC's, the
push speed remembered, and what a failed step says (the whole day runs in test_daily_session.py)."""

import re
import shutil
import subprocess
from argparse import Namespace
from pathlib import Path

import pytest
from dvc_helpers import REPO, configure_git, run

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


def forked_machines(tmp_path, monkeypatch) -> tuple[command.Day, Path]:
    """Machine y committed a session while machine x pushed another one to the same bare remote (real git); the
    test runs in y, whose Day is returned with the remote's folder."""
    run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", "remote.git")
    for name in ("x", "y"):
        run(tmp_path, "git", "clone", "-q", "remote.git", name)
        configure_git(tmp_path / name)
    seed = tmp_path / "x"
    (seed / "dvc.lock").write_text("stages: {}\n")
    run(seed, "git", "add", "-A")
    run(seed, "git", "commit", "-q", "-m", "project")
    run(seed, "git", "push", "-q", "-u", "origin", "main")
    run(tmp_path / "y", "git", "pull", "-q")
    run(tmp_path / "y", "git", "branch", "-q", "--set-upstream-to=origin/main")
    for name, step in (("x", 4), ("y", 6)):
        (tmp_path / name / "dvc.lock").write_text(f"stages: {{train: {{step: {step}}}}}\n")
        run(tmp_path / name, "git", "commit", "-q", "-am", f"Session 2: steps 2 -> {step} of 8")
    run(seed, "git", "push", "-q")
    monkeypatch.chdir(tmp_path / "y")
    day = command.Day(Namespace(steps=2, minutes=None))
    day.upstream, day.git_remote, day.summary = "origin/main", "origin", "Session 2: steps 2 -> 6 of 8"
    return day, tmp_path / "remote.git"


def test_a_rejected_git_push_puts_the_session_on_a_branch_and_both_ways_on_continue_cleanly(tmp_path, monkeypatch,
                                                                                           capsys):
    day, remote = forked_machines(tmp_path, monkeypatch)
    day.push_commit()
    out = capsys.readouterr().out
    branch = day.session_branch
    assert re.fullmatch(r"sessions/[A-Za-z0-9._-]+-\d{8}-\d{6}", branch)
    assert run(remote, "git", "log", "-1", "--format=%s", "main") == "Session 2: steps 2 -> 4 of 8\n"
    assert run(remote, "git", "log", "-1", "--format=%s", branch) == "Session 2: steps 2 -> 6 of 8\n"
    assert f"- origin/{branch}: this session (Session 2: steps 2 -> 6 of 8)" in out
    assert "never merge them" in out
    theirs_line, mine_line = [line.strip() for line in out.splitlines() if line.startswith("    git ")]
    assert theirs_line.endswith("&& dvc pull")  # what the other line needs besides git: its data
    shutil.copytree(Path.cwd(), tmp_path / "y-other-line")
    for way, where in ((theirs_line.removesuffix(" && dvc pull"), tmp_path / "y-other-line"), (mine_line, Path.cwd())):
        for part in way.split(" && "):  # each way leaves a clean tree: no merge, no conflict
            run(where, *part.split())
        assert run(where, "git", "status", "--porcelain") == ""
    assert run(tmp_path / "y-other-line", "git", "log", "-1", "--format=%s") == "Session 2: steps 2 -> 4 of 8\n"
    # This session's line made the remote's main; the other session is kept on a branch of its own.
    assert run(remote, "git", "log", "-1", "--format=%s", "main") == "Session 2: steps 2 -> 6 of 8\n"
    kept = [b for b in run(remote, "git", "branch", "--format=%(refname:short)").split() if "replaced" in b]
    assert run(remote, "git", "log", "-1", "--format=%s", kept[0]) == "Session 2: steps 2 -> 4 of 8\n"


def test_arguments_are_checked():
    assert command._parse_args(["--steps", "10", "--minutes", "auto"]) == Namespace(steps=10, minutes="auto")
    assert command._parse_args(["--minutes", "90"]).minutes == 90.0
    with pytest.raises(SystemExit):
        command._parse_args(["--minutes", "soon"])
