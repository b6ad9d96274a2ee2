"""Sessions of the train stage: split, interrupted, killed or repeated, a run ends exactly where one session would."""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    LONG_RUN,
    checkpoint_step,
    make_workspace,
    read_tsv,
    run_stage,
    session,
    stage_command,
    stage_env,
    tree_bytes,
    wait_for_steps,
    write_params,
)
from transformers import AutoModelForCausalLM

from stages.lib.base.devices import pick_device
from stages.lib.base.errors import UserError
from stages.lib.checkpointing.hashing import model_digest
from stages.lib.modeling.precision import pick_precision
from stages.lib.training.loop import SessionTimer

METRICS = ("train/loss", "val/loss", "lr", "grad_norm", "tokens_seen")
OUTPUTS = ("checkpoints", "outputs", "models", ".checkpoint-recovery")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 12-step run done in one in-process session: what every other way of running it must reproduce."""
    root = make_workspace(tmp_path_factory.mktemp("reference"))
    result = session(root)
    assert (result.start_step, result.end_step, result.stopped_by) == (0, 12, "budget")
    return root


def weights(root, step=12):
    return (root / "checkpoints" / f"step-{step:08d}" / "model.safetensors").read_bytes()


def assert_same_run(root, reference):
    assert weights(root) == weights(reference)
    assert tree_bytes(root / "models") == tree_bytes(reference / "models")
    for metric in METRICS:
        assert read_tsv(root, metric) == read_tsv(reference, metric), metric
    assert [step for step, _ in read_tsv(root, "train/loss")] == list(range(1, 13))


def test_three_sessions_in_separate_processes_equal_one_session(reference, tmp_path):
    root = make_workspace(tmp_path)
    for day in range(3):
        done = run_stage(root, steps_today=4)
        assert done.returncode == 0, done.stderr
        assert checkpoint_step(root) == 4 * (day + 1)
        if day:
            assert f"resuming from step {4 * day}" in done.stdout
    assert_same_run(root, reference)


def test_sigterm_finishes_the_step_saves_and_the_next_session_resumes_there(tmp_path):
    root = make_workspace(tmp_path)
    write_params(root, **LONG_RUN)
    process = subprocess.Popen(stage_command(), cwd=root, env=stage_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    wait_for_steps(root, process, 3)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM" in stderr
    stopped_at = checkpoint_step(root)
    assert [step for step, _ in read_tsv(root, "train/loss")] == list(range(1, stopped_at + 1))

    result = session(root, steps_today=2, **LONG_RUN)
    assert (result.start_step, result.end_step) == (stopped_at, stopped_at + 2)
    assert [step for step, _ in read_tsv(root, "train/loss")] == list(range(1, stopped_at + 3))


def test_a_second_session_fails_at_once_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    root = make_workspace(tmp_path)
    write_params(root, **LONG_RUN)
    first = subprocess.Popen(stage_command(), cwd=root, env=stage_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    wait_for_steps(root, first, 1)
    with pytest.raises(UserError, match=rf"held by process {first.pid} on .*only one may run at a time"):
        session(root, **LONG_RUN)
    first.kill()  # a SIGKILL: the process cannot clean up, its name stays in the lock file
    first.wait(timeout=30)
    capsys.readouterr()
    assert session(root, steps_today=1, **LONG_RUN).end_step == 1  # it never saved: a new run
    assert f"took over .checkpoint-recovery.lock, left by process {first.pid}" in capsys.readouterr().out


HANG_WHILE_SAVING = """
import json, sys, time
from pathlib import Path
import stages.lib.checkpointing.store as store
from stages.train import main

def hang(tmp):
    if json.loads((tmp / "state.json").read_text())["step"] == STEP and tmp.parent.name == "checkpoints":
        Path("hanging-in-save").write_text(str(tmp))
        time.sleep(600)

store._before_publish = hang
main()
"""


def killed_while_saving(root, step):
    """Run a session that is SIGKILLed while it saves the checkpoint of `step` (before that one is published)."""
    process = subprocess.Popen(stage_command(HANG_WHILE_SAVING.replace("STEP", str(step))), cwd=root,
                               env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not (root / "hanging-in-save").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert (root / "hanging-in-save").exists(), process.stderr.read() if process.poll() is not None else "timeout"
    process.kill()
    process.wait(timeout=30)
    (root / "hanging-in-save").unlink()


def test_sigkill_while_saving_keeps_the_previous_checkpoint_and_the_run_stays_exact(reference, tmp_path):
    root = make_workspace(tmp_path)
    write_params(root)
    killed_while_saving(root, 8)
    assert checkpoint_step(root) == 4
    assert (root / "checkpoints" / ".tmp-step-00000008").is_dir()  # the half-done save, never taken for a checkpoint
    assert read_tsv(root, "train/loss")[-1][0] == 8  # logged past the checkpoint before dying

    result = session(root)
    assert (result.start_step, result.end_step) == (4, 12)
    assert_same_run(root, reference)
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["step-00000012"]


SLOW_STEPS = """
import time
from stages.lib.training.loop import Session
from stages.train import main

step = Session.step
Session.step = lambda self, n: (time.sleep(0.1), step(self, n))[1]  # a kill then lands inside the session
main()
"""


def test_sigkill_at_random_moments_then_the_same_command_again_ends_with_the_uninterrupted_weights(reference,
                                                                                                  tmp_path):
    root = make_workspace(tmp_path)
    write_params(root, save_every=2)  # a session-only setting: the run is the reference's
    rng = random.Random(7)
    killed_while_saving(root, 4)  # once in the middle of a save
    for _ in range(4):
        process = subprocess.Popen(stage_command(SLOW_STEPS), cwd=root, env=stage_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        before = read_tsv(root, "train/loss")
        deadline = time.monotonic() + 90
        while read_tsv(root, "train/loss") == before and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the session is training: kill it a moment later
        time.sleep(rng.uniform(0.0, 0.3))
        process.kill()
        assert process.wait(timeout=30) == -signal.SIGKILL, "the session ended before the kill: slow its steps"
    done = run_stage(root, save_every=2)
    assert done.returncode == 0, done.stderr
    assert_same_run(root, reference)


def test_after_a_crash_the_recovery_copy_beats_the_older_checkpoint_dvc_restores(reference, tmp_path, capsys):
    root = make_workspace(tmp_path)
    session(root, steps_today=4)
    recorded, recorded_logs = tmp_path / "recorded-by-dvc", tmp_path / "logs-recorded-by-dvc"
    shutil.copytree(root / "checkpoints", recorded)
    shutil.copytree(root / "outputs" / "live", recorded_logs)
    write_params(root)
    killed_while_saving(root, 12)  # saved step 8, then killed: its session never ended, DVC never recorded it
    # `dvc exp run` checks out the checkpoint and the logs recorded in dvc.lock over the newer ones.
    restore(recorded, recorded_logs, root)
    capsys.readouterr()
    assert session(root, steps_today=0, minutes_today=1e-4).end_step == 8  # no time to train: only puts it back
    assert "is newer than the step 4 that DVC restored into checkpoints" in capsys.readouterr().out
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["step-00000008"]
    assert session(root).start_step == 8
    assert_same_run(root, reference)


def test_a_checkpoint_restored_on_purpose_beats_the_newer_recovery_copy_of_a_recorded_session(tmp_path, capsys,
                                                                                                monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "train")  # these sessions run under DVC, which records their checkpoints
    root = make_workspace(tmp_path)
    session(root, steps_today=4)
    recorded, recorded_logs = tmp_path / "commit-1", tmp_path / "commit-1-logs"
    shutil.copytree(root / "checkpoints", recorded)
    shutil.copytree(root / "outputs" / "live", recorded_logs)
    session(root, steps_today=4)
    # `git checkout <commit 1> && dvc checkout`: the older checkpoint and logs, on purpose.
    restore(recorded, recorded_logs, root)
    capsys.readouterr()
    assert session(root, steps_today=1).start_step == 4
    assert "restored on purpose: the newer step 8" in capsys.readouterr().out
    assert [step for step, _ in read_tsv(root, "train/loss")] == list(range(1, 6))
    assert [step for step, _ in read_tsv(root, "val/loss")] == [4, 5]
    assert [p.name for p in (root / ".checkpoint-recovery").glob("step-*")] == ["step-00000005"]


def restore(checkpoints, logs, root):
    for restored, folder in ((checkpoints, root / "checkpoints"), (logs, root / "outputs" / "live")):
        shutil.rmtree(folder)
        shutil.copytree(restored, folder)


def test_a_session_after_the_budget_is_spent_changes_nothing(reference, tmp_path, capsys):
    root = tmp_path / "workspace"
    shutil.copytree(reference, root)
    before = {folder: tree_bytes(root / folder) for folder in OUTPUTS}
    stamps = {p: p.stat().st_mtime_ns for folder in OUTPUTS for p in (root / folder).rglob("*")}
    result = session(root)
    assert result.stopped_by == "nothing-to-do" and result.end_step == 12
    assert "budget of 12 steps is spent" in capsys.readouterr().out
    assert {folder: tree_bytes(root / folder) for folder in OUTPUTS} == before
    assert {p: p.stat().st_mtime_ns for folder in OUTPUTS for p in (root / folder).rglob("*")} == stamps
    # DVC deletes a non-persistent output (the export) before running the stage: it comes back byte-identical.
    shutil.rmtree(root / "models" / "tiny")
    session(root)
    assert tree_bytes(root / "models") == before["models"]


def test_resume_rules_and_what_they_say(tmp_path, capsys):
    root = make_workspace(tmp_path)
    session(root, steps_today=2)
    with pytest.raises(UserError, match=r"different run; changed: lr: 0\.01 -> 0\.02.*train\.resume: auto"):
        session(root, lr=0.02, resume="require")
    capsys.readouterr()
    assert session(root, lr=0.02, steps_today=1).start_step == 0  # auto: a new run
    assert "starting a new run" in capsys.readouterr().out
    assert [step for step, _ in read_tsv(root, "train/loss")] == [1]
    # Session-only settings, and a global batch split differently (2 x 2 instead of 4 x 1), still resume.
    same_run = session(root, lr=0.02, steps_today=1, resume="require", batch_size=2, grad_accum=2, eval_every=7,
                       save_every=9, eval_batches=1, minutes_today=30)
    assert (same_run.start_step, same_run.end_step) == (1, 2)
    assert session(root, lr=0.02, steps_today=1, resume="never").start_step == 0
    shutil.rmtree(root / "checkpoints")
    shutil.rmtree(root / ".checkpoint-recovery")
    with pytest.raises(UserError, match=r"logs of earlier sessions.*did you forget `dvc pull`"):
        session(root, lr=0.02, resume="require")


def test_grad_accumulation_matches_the_same_global_batch_in_one_go(tmp_path):
    one_go = make_workspace(tmp_path / "one-go")
    accumulated = make_workspace(tmp_path / "accumulated")
    session(one_go, batch_size=8, grad_accum=1, total_step_budget=5)
    session(accumulated, batch_size=4, grad_accum=2, total_step_budget=5)
    a = load_file(one_go / "checkpoints" / "step-00000005" / "model.safetensors")
    b = load_file(accumulated / "checkpoints" / "step-00000005" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    losses = [[float(v) for _, v in read_tsv(root, "train/loss")] for root in (one_go, accumulated)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_zero_step_budget_means_epochs_over_the_training_windows(tmp_path):
    root = make_workspace(tmp_path)
    result = session(root, total_step_budget=0, epochs=2, batch_size=16, save_every=100, eval_every=100)
    windows = (2000 - 1) // 16
    assert result.end_step == -(-2 * windows // 16)  # 15.5 steps rounded up
    assert checkpoint_step(root) == result.end_step


def test_minutes_today_stops_in_time_with_a_checkpoint_and_an_export(tmp_path):
    root = make_workspace(tmp_path)
    began = time.monotonic()
    result = session(root, total_step_budget=100_000, minutes_today=0.1, eval_every=100_000, save_every=100_000)
    assert result.stopped_by == "time" and 0 < result.end_step < 100_000
    assert time.monotonic() - began < 6 + 3  # 6 s allowed; slack for a machine under load
    assert checkpoint_step(root) == result.end_step
    assert (root / "models" / "tiny" / "model.safetensors").exists()


def test_no_time_for_one_step_trains_and_writes_nothing(tmp_path):
    root = make_workspace(tmp_path)
    result = session(root, minutes_today=0.0001)
    assert (result.stopped_by, result.end_step) == ("time", 0)
    assert not any((root / folder).exists() for folder in OUTPUTS)


def test_the_timer_reserves_the_slowest_recent_step_and_the_measured_closing_work():
    now = time.monotonic()
    timer = SessionTimer(deadline=now + 10, guesses={"eval": 1.0, "save": 1.0, "export": 1.0},
                         step_times=[1.0, 4.0, 1.0])
    assert timer.allows_step()  # 4 s step + 3 s guessed reserve fit in 10 s
    timer.measured = {"eval": 2.0, "save": 2.0, "export": 2.0}  # measured: 7.2 s with the 20% margin
    assert not timer.allows_step()
    assert SessionTimer(deadline=float("inf"), guesses={"save": 1e9}).allows_step()


def test_without_validation_the_timer_still_counts_the_measured_save():
    timer = SessionTimer(deadline=time.monotonic() + 10, guesses={"save": 0.5, "export": 0.5}, step_times=[1.0])
    assert timer.allows_step()
    timer.measured = {"save": 8.0}  # a slow disk: the save alone takes 9.6 s with its margin, plus the export's guess
    assert timer.reserve() == pytest.approx(8.0 * 1.2 + 0.5)
    assert not timer.allows_step()


def test_fine_tuning_a_pretrained_folder_trains_and_exports_it_and_its_weights_define_the_run(tmp_path, capsys):
    base = make_workspace(tmp_path / "base")
    session(base, total_step_budget=2)
    root = make_workspace(tmp_path / "tuned")
    result = session(root, init_from=str(base / "models" / "tiny"), total_step_budget=3, steps_today=2)
    assert result.end_step == 2
    state = json.loads((root / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert "model.n_layer" not in state["fingerprint_values"]  # the folder's config, not train.model, defines it
    assert str(base) not in json.dumps(state["fingerprint_values"])  # by content, not by path
    assert AutoModelForCausalLM.from_pretrained(root / "models" / "tiny").config.vocab_size == 64
    # The same folder by a relative path is the same run.
    relative = os.path.relpath(base / "models" / "tiny", root)
    assert session(root, init_from=relative, total_step_budget=3, steps_today=1).start_step == 2
    # Other weights in the same folder: a new run, named as such.
    session(base, total_step_budget=3)
    capsys.readouterr()
    assert session(root, init_from=relative, total_step_budget=3, steps_today=1).start_step == 0
    assert "the base model in train.init_from (its config or weight files) changed" in capsys.readouterr().out


def test_a_model_folder_is_hashed_once_while_its_files_are_unchanged(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights" * 1000)
    (folder / "README.md").write_text("not part of the model")
    cache = tmp_path / "hashes.json"
    digest = model_digest(folder, cache)
    entries = json.loads(cache.read_text())
    assert len(entries) == 2  # config and weights; the README does not count
    for entry in entries.values():
        entry["sha256"] = "0" * 64  # what the cache says is believed while size and mtime are unchanged
    cache.write_text(json.dumps(entries))
    assert model_digest(folder, cache) != digest
    for name in ("config.json", "model.safetensors"):  # rewritten: a new mtime, so hashed again
        (folder / name).write_bytes((folder / name).read_bytes())
    assert model_digest(folder, cache) == digest


def test_precision_and_device_choices_on_a_cpu_only_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = pick_device("auto")
    assert cpu.type == "cpu" and pick_precision("auto", cpu).name == "fp32"
    with pytest.raises(UserError,
                       match=r"cuda. was asked for \(train\.device or --device\), but torch sees no CUDA GPU"):
        pick_device("cuda")


def test_val_loss_is_scored_on_the_same_samples_whatever_the_sessions_batch_size(tmp_path):
    root = make_workspace(tmp_path)
    # A learning rate too small to move any weight: both sessions score the same weights.
    run = {"lr": 1e-30, "min_lr": 0.0, "total_step_budget": 4, "eval_every": 2, "eval_batches": 2}
    session(root, steps_today=2, batch_size=4, grad_accum=2, **run)
    session(root, batch_size=2, grad_accum=4, **run)  # the same global batch of 8, in smaller batches
    losses = read_tsv(root, "val/loss")
    assert [step for step, _ in losses] == [2, 4]
    assert float(losses[1][1]) == pytest.approx(float(losses[0][1]), rel=1e-6, abs=0)


@pytest.mark.slow  # inductor's first compile on a CPU: over a minute (160 s measured on a busy 2-core machine)
def test_a_compiled_run_trains_saves_and_resumes_with_the_eager_models_names(tmp_path):
    # inductor compiles on the CPU (with the machine's C compiler): the path train.compile takes on a GPU.
    eager = make_workspace(tmp_path / "eager")
    session(eager, total_step_budget=4)
    compiled = make_workspace(tmp_path / "compiled")
    for day in range(2):
        result = session(compiled, total_step_budget=4, steps_today=2, compile=True)
        assert (result.start_step, result.end_step) == (2 * day, 2 * day + 2)
    for folder in ("checkpoints/step-00000004", "models/tiny"):
        ours, theirs = (load_file(root / folder / "model.safetensors") for root in (compiled, eager))
        assert ours.keys() == theirs.keys() and not any("_orig_mod" in name for name in ours)
        for name, value in ours.items():  # compiled kernels round differently: close, not bitwise
            torch.testing.assert_close(value, theirs[name], rtol=1e-3, atol=1e-5, msg=name)
    assert [step for step, _ in read_tsv(compiled, "train/loss")] == [1, 2, 3, 4]
    assert [float(v) for _, v in read_tsv(compiled, "train/loss")] == pytest.approx(
        [float(v) for _, v in read_tsv(eager, "train/loss")], rel=1e-4)
