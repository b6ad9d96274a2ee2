"""Never losing a session, with the real git and dvc commands: two machines on one day (the lease), a time limit
that holds for the whole command, and recovery after a kill between the train stage's end and DVC's commit, or of a
`dvc exp run --temp` run.

The tests share one project and run in order: machine A starts a session and machine B, started meanwhile, is
refused; B then runs a session under a short time limit with a slow evaluate stage; then A's workspace is used for
the kills.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from dvc_helpers import checkpoint_step, command_env, configure_git, needs_dvc, new_project, run, set_params

pytestmark = [needs_dvc, pytest.mark.slow]

PARAMS = {
    "tokenizer": {"vocab_size": 320},
    "train": {
        "model": {"n_layer": 1, "hidden_size": 32, "n_head": 2, "max_position_embeddings": 2048},
        "seq_len": 32, "batch_size": 4, "warmup_steps": 1, "total_step_budget": 100_000, "save_every": 1000,
        "eval_every": 1000, "eval_batches": 2,
    },
    "evaluate": {"max_val_tokens": 256, "num_prompts": 1, "max_new_tokens": 2},
}
SLOW_EVALUATE = {"num_prompts": 0, "max_new_tokens": 1500, "batch_size": 1}  # every prompt, one at a time, at length


def session(machine, *args) -> subprocess.Popen:
    """The daily command on `machine`, started."""
    return subprocess.Popen([sys.executable, "-m", "stages.session", *args], cwd=machine, env=command_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)


def wait_for(condition, seconds: float = 300, what: str = ""):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A git remote and a DVC remote holding the project, and two machines that cloned it."""
    root = tmp_path_factory.mktemp("safety")
    origin = new_project(root / "origin", root / "dvc-remote", PARAMS)
    remote = root / "remote.git"
    run(root, "git", "clone", "-q", "--bare", str(origin), str(remote))
    machines = {}
    for name in ("a", "b"):
        machines[name] = root / name
        run(root, "git", "clone", "-q", str(remote), str(machines[name]))
        configure_git(machines[name])
    return {"root": root, "remote": remote, **machines}


def test_a_second_machine_started_while_the_first_trains_is_refused_before_training(world):
    first = session(world["a"], "--steps", "3")
    leased = lambda: run(world["remote"], "git", "ls-remote", ".", "refs/stepwise/lease/main")  # noqa: E731
    wait_for(lambda: leased() or first.poll() is not None, what="machine A's lease")
    second = subprocess.run([sys.executable, "-m", "stages.session", "--steps", "3"], cwd=world["b"],
                            env=command_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    out_a = first.communicate(timeout=600)[0]
    assert first.returncode == 0, out_a
    assert second.returncode == 1, second.stdout
    assert "error: another session of this run is training on" in second.stderr
    assert "expected to end at" in second.stderr or "with no time limit" in second.stderr
    assert "== 3/8" not in second.stdout and not (world["b"] / "checkpoints").exists()  # refused before pulling
    assert run(world["remote"], "git", "log", "-1", "--format=%s", "main~1") == "Session 1: steps 0 -> 3 of 100000\n"
    assert run(world["remote"], "git", "ls-remote", ".", "refs/stepwise/lease/main") == ""  # A dropped it


def test_a_session_given_minutes_ends_pushed_and_committed_within_them(world):
    run(world["b"], "git", "pull", "-q")
    set_params(world["b"], {"evaluate": SLOW_EVALUATE})
    run(world["b"], "git", "commit", "-q", "-am", "A slow evaluate stage")
    began = time.monotonic()
    day = session(world["b"], "--steps", "0", "--minutes", "1.5")  # B continues A's session, for 90 s at most
    out = day.communicate(timeout=600)[0]
    took = time.monotonic() - began
    assert day.returncode == 0, out
    assert took < 90, f"the command took {took:.0f} s of its 90:\n{out}"
    assert "resuming from step 3" in out and "this command ends by" in out
    # The evaluate stage got the time it needs by A's measure: stopped when that was too short, skipped when even
    # that was more than half the time left or when the session's closing work left none (a loaded machine),
    # committed when it finished in time.
    stopped = "evaluate stopped: it did not finish in the" in out
    evaluated = "Session 2: evaluated the model at step" in out
    assert stopped or evaluated or "evaluate skipped today: " in out, out
    step = checkpoint_step(world["b"])
    assert step > 3
    titles = run(world["remote"], "git", "log", "--format=%s", "main").splitlines()
    assert titles[int(stopped or evaluated)].startswith(f"Session 2: steps 3 -> {step} of 100000"), titles
    log = [json.loads(line) for line in (world["b"] / "outputs/sessions.jsonl").read_text().splitlines()]
    assert log[-1]["dvc_commit"]["seconds"] > 0
    if stopped:
        assert titles[0].startswith("Session 2: evaluate stopped after") and log[-1]["evaluate"]["finished"] is False
    assert "checkpoints" not in run(world["b"], "dvc", "status", "--cloud")  # the checkpoint is on the DVC remote
    assert run(world["b"], "git", "status", "--porcelain") == ""


def test_a_kill_between_the_train_stages_end_and_dvcs_commit_then_dvc_exp_run_the_newer_checkpoint_wins(world):
    machine = world["a"]
    run(machine, "git", "pull", "-q")
    run(machine, "dvc", "pull", "-q")
    assert checkpoint_step(machine) == (step := checkpoint_step(world["b"]))
    set_params(machine, {"train": {"steps_today": 3, "minutes_today": 0}})  # as the daily command writes them
    # The train stage as DVC runs it (DVC_STAGE set), which DVC never commits: as if killed while hashing.
    env = {**command_env(), "DVC_STAGE": "train", "DVC_ROOT": str(machine)}
    done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=machine, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert checkpoint_step(machine) == step + 3
    out = run(machine, "dvc", "exp", "run")  # checks out dvc.lock's older checkpoint first
    assert f"is newer than the step {step} that DVC restored into checkpoints" in out, out
    assert f"resuming from step {step + 3}" in out, out


def test_a_dvc_exp_run_temp_killed_mid_session_resumes_from_its_last_checkpoint(world):
    machine = world["a"]
    recovery = machine / ".checkpoint-recovery"
    before = {p.name for p in recovery.glob("step-*")}
    killed = subprocess.Popen(["dvc", "exp", "run", "--temp", "-S", "train.steps_today=0", "-S", "train.save_every=2"],
                              cwd=machine, env=command_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    saved = lambda: {p.name for p in recovery.glob("step-*")} - before  # noqa: E731
    wait_for(lambda: saved() or killed.poll() is not None, what="a checkpoint of the --temp run at the project's top")
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    last = max(int(name.removeprefix("step-")) for name in saved())
    out = run(machine, "dvc", "exp", "run", "--temp", "-S", "train.steps_today=1")
    assert f"resuming from step {last}" in out, out
