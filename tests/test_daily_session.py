"""The daily session as users live it: one command a day on two machines (two clones of one git remote, one DVC
remote), and the day's notebook, with the real git and dvc commands.

The tests share one project and run in order, as the days do: machine A trains day 1, machine B day 2, A day 3,
and the weights after day 3 equal one uninterrupted run's. Tiny params keep each day to seconds of training.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dvc_helpers import REPO, checkpoint_step, command_env, configure_git, needs_dvc, new_project, run
from safetensors.torch import load_file
from train_helpers import session

from stages.lib.base.params import load_params

pytestmark = [needs_dvc, pytest.mark.slow]

STEPS_A_DAY = 2
PARAMS = {
    "tokenizer": {"vocab_size": 320},
    "train": {
        "model": {"n_layer": 1, "hidden_size": 32, "n_head": 2, "max_position_embeddings": 64},
        "seq_len": 32, "batch_size": 4, "warmup_steps": 1, "total_step_budget": 8, "save_every": 100,
        "eval_every": 2, "eval_batches": 2,
    },
    "evaluate": {"max_val_tokens": 256, "num_prompts": 1, "max_new_tokens": 2},
}


def readme_daily_command() -> list[str]:
    """The one command the README's daily block asks for, with this test's steps a day."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("**Every day**", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert len(commands) == 1, f"the README's daily block should be one command, not {commands}"
    words = commands[0].split()
    assert words[0].endswith("python") and words[1:3] == ["-m", "stages.session"], commands
    return [sys.executable, "-m", "stages.session", "--steps", str(STEPS_A_DAY)]


def fresh_shell() -> dict:
    """The environment of a new shell: the Python environment's tools not on PATH (nothing activated)."""
    env = command_env()
    tools = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != tools)
    return env


def a_day(machine) -> str:
    """One day on `machine`: the README's one command, in a fresh shell."""
    done = subprocess.run(readme_daily_command(), cwd=machine, env=fresh_shell(), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def sessions_on_the_remote(remote) -> list[str]:
    """The sessions' commits on the remote's main, newest first (not the project's, nor the evaluate stage's)."""
    titles = run(remote, "git", "log", "--format=%s", "main").splitlines()[:-1]  # the oldest is the project itself
    return [title for title in titles if ": evaluated" not in title]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A git remote and a DVC remote holding the project, and two machines that cloned it (setup, done once)."""
    root = tmp_path_factory.mktemp("daily")
    origin = new_project(root / "origin", root / "dvc-remote", PARAMS)
    remote = root / "remote.git"
    run(root, "git", "clone", "-q", "--bare", str(origin), str(remote))
    machines = {}
    for name in ("a", "b"):
        machines[name] = root / name
        run(root, "git", "clone", "-q", str(remote), str(machines[name]))
        configure_git(machines[name])
    return {"root": root, "remote": remote, "dvc_remote": root / "dvc-remote", **machines}


def test_day_1_on_machine_a_trains_commits_and_pushes(world):
    out = a_day(world["a"])
    for step in ("1/8 checking the workspace", "2/8 taking the lease", "3/8 pulling", "4/8 training: dvc repro train",
                 "5/8 pushing the data", "6/8 committing", "7/8 pushing the commit", "8/8 evaluating"):
        assert f"== {step}" in out, out
    assert "$ git pull --ff-only" in out and "$ dvc push" in out and "$ git push" in out
    assert "took the lease (refs/stepwise/lease/main in origin)" in out and "dropped the lease" in out
    # The session is on both remotes before the optional evaluate stage runs.
    assert out.index("$ git push") < out.index("$ dvc repro -s evaluate")
    assert "dvc.lock records no stage yet: no data to pull (this is the first session)" in out
    assert checkpoint_step(world["a"]) == 2
    assert sessions_on_the_remote(world["remote"]) == ["Session 1: steps 0 -> 2 of 8"]
    last = run(world["remote"], "git", "log", "-1", "--format=%s", "main")
    assert last == "Session 1: evaluated the model at step 2\n"
    assert run(world["remote"], "git", "ls-remote", ".", "refs/stepwise/*") == ""  # the lease was dropped
    assert run(world["a"], "git", "status", "--porcelain") == ""  # everything the session changed is committed
    log = [json.loads(line) for line in (world["a"] / "outputs/sessions.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in log] == [[0, 2]] and log[0]["push"]["bytes"] > 0
    assert log[0]["dvc_commit"]["seconds"] > 0 and log[0]["evaluate"]["seconds"] > 0


def test_day_2_on_machine_b_continues_from_day_1(world):
    out = a_day(world["b"])
    assert "$ dvc pull evaluate reference render tokenize tokenizer train" in out and "resuming from step 2" in out, out
    assert '$ git commit -m "Session 2: steps 2 -> 4 of 8"' in out
    assert checkpoint_step(world["b"]) == 4
    message = run(world["remote"], "git", "log", "-1", "--format=%B", "main~1")  # main: its evaluate commit
    assert message.startswith("Session 2: steps 2 -> 4 of 8\n\nTrained on "), message
    assert re.search(r"train/loss \d\.\d{4} -> \d\.\d{4}", message) and "val/loss" in message


def test_day_3_back_on_a_equals_one_uninterrupted_run(world, tmp_path):
    a_day(world["a"])
    assert checkpoint_step(world["a"]) == 6
    assert len(sessions_on_the_remote(world["remote"])) == 3

    # The same run in one session of 6 steps, on the data the pipeline made.
    reference = tmp_path / "reference"
    shutil.copytree(world["a"] / "data", reference / "data")
    session(reference, replace(load_params(world["a"] / "params.yaml").train, steps_today=6))
    days = load_file(world["a"] / "checkpoints/step-00000006/model.safetensors")
    once = load_file(reference / "checkpoints/step-00000006/model.safetensors")
    assert days.keys() == once.keys() and all(torch.equal(days[k], once[k]) for k in days)


def test_the_command_refuses_a_workspace_with_changes_of_yours(world):
    params = world["b"] / "params.yaml"
    params.write_text(params.read_text().replace("total_step_budget: 8", "total_step_budget: 10"))
    done = subprocess.run([sys.executable, "-m", "stages.session"], cwd=world["b"], env=command_env(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 1
    assert "error: these files have changes that are not DVC's: params.yaml. Commit them first" in done.stderr
    assert "== 2/8" not in done.stdout  # nothing else was done
    run(world["b"], "git", "checkout", "--", "params.yaml")


def test_a_failed_pull_stops_before_training_and_says_why(world, tmp_path):
    stranger = tmp_path / "c"
    run(tmp_path, "git", "clone", "-q", str(world["remote"]), str(stranger))
    configure_git(stranger)
    run(stranger, "dvc", "remote", "modify", "--local", "storage", "url", str(tmp_path / "empty-remote"))
    done = subprocess.run([sys.executable, "-m", "stages.session"], cwd=stranger, env=command_env(),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stdout
    assert "error: dvc pull failed (see above): nothing was trained" in done.stderr
    assert "== 4/8" not in done.stdout and not (stranger / "checkpoints").exists()


def test_the_notebook_runs_a_day_top_to_bottom(world, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "daily_session.ipynb", as_version=4)
    # Colab's and Kaggle's cells, and the install the test environment already has, are skipped.
    notebook.cells = [c for c in notebook.cells if not {"colab", "kaggle", "install"} & set(c.metadata.get("tags", []))]
    at = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell(
        f"REPO_URL = {str(world['remote'])!r}\nWORKDIR = {str(tmp_path)!r}\nSTEPS = {STEPS_A_DAY}\n"
        "GIT_NAME, GIT_EMAIL = 'test', 'test@example.com'"))
    for key, value in command_env().items():
        monkeypatch.setenv(key, value)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3").execute()
    assert checkpoint_step(tmp_path / "project") == 8
    assert sessions_on_the_remote(world["remote"])[0] == "Session 4: steps 6 -> 8 of 8"
    output = "".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert "eval.val_loss" in output and "kept back from training: the push at" in output
    assert "(the last push)" in output
    assert "train.minutes_today = auto: no time limit found" in output  # no notebook service on a test machine
    assert any("image/svg+xml" in o.get("data", {}) for c in notebook.cells for o in c.get("outputs", []))
