"""The daily workflow end to end, with the real `dvc` CLI in a temporary git repository made from this one.

The tests in this file share one repository and run in order: each continues where the previous one left it, as a
user's days do. Tiny params keep the whole file to a few minutes on 2 cores.
"""

import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dvc_helpers import REPO, checkpoint_step, command_env, needs_dvc, new_project, run, set_params

TINY_PARAMS = {
    "tokenizer": {"vocab_size": 320},
    "train": {
        "model": {"n_layer": 1, "hidden_size": 32, "n_head": 2, "max_position_embeddings": 64},
        "seq_len": 32, "batch_size": 4, "warmup_steps": 1, "total_step_budget": 6, "steps_today": 2,
        "save_every": 100, "eval_every": 2, "eval_batches": 2,
    },
    "evaluate": {"max_val_tokens": 2048, "num_prompts": 4, "max_new_tokens": 6},
}

pytestmark = needs_dvc


def ran(output: str, stage: str) -> bool:
    return f"Running stage '{stage}'" in output


def skipped(output: str, stage: str) -> bool:
    return f"Stage '{stage}' didn't change, skipping" in output


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    return new_project(root / "project", root / "remote", TINY_PARAMS)


def test_first_repro_runs_every_stage(repo):
    out = run(repo, "dvc", "repro")
    for stage in ("render", "tokenizer", "tokenize", "train", "evaluate"):
        assert ran(out, stage), out
    assert checkpoint_step(repo) == 2
    assert (repo / "models/sample-arith/model.safetensors").exists()
    assert "val_loss" in json.loads((repo / "outputs/eval/metrics.json").read_text())["eval"]


def test_nothing_the_pipeline_writes_is_a_pickle(repo):
    from test_checkpoint import pickles
    for folder in ("data", "checkpoints", ".checkpoint-recovery", "models", "outputs"):
        assert pickles(repo / folder) == [], folder


def test_repro_trains_one_session_per_run_until_the_budget_is_spent(repo):
    out = run(repo, "dvc", "repro")
    assert skipped(out, "render") and skipped(out, "tokenize") and ran(out, "train"), out
    assert checkpoint_step(repo) == 4
    run(repo, "dvc", "repro")
    assert checkpoint_step(repo) == 6
    lock = (repo / "dvc.lock").read_text()
    out = run(repo, "dvc", "repro")
    assert checkpoint_step(repo) == 6
    assert skipped(out, "evaluate"), out
    assert (repo / "dvc.lock").read_text() == lock


def test_a_changed_param_reruns_only_what_depends_on_it(repo):
    set_params(repo, {"evaluate": {"max_new_tokens": 4}})
    out = run(repo, "dvc", "repro")
    assert ran(out, "evaluate") and not ran(out, "tokenize"), out
    assert checkpoint_step(repo) == 6  # the spent budget trains nothing

    set_params(repo, {"tokenize": {"val_ratio": 0.1}})
    out = run(repo, "dvc", "repro")
    assert skipped(out, "render") and skipped(out, "tokenizer"), out
    assert ran(out, "tokenize") and ran(out, "train") and ran(out, "evaluate"), out
    assert checkpoint_step(repo) == 2  # other data: a fresh run, one session so far
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "val_ratio 0.1")


def test_two_exp_run_sessions_equal_one_session_of_twice_the_steps(repo):
    set_params(repo, {"train": {"seed": 7}})  # a new run, started by the first session below
    run(repo, "dvc", "exp", "run", "-S", "train.steps_today=2")
    out = run(repo, "dvc", "exp", "run", "-S", "train.steps_today=2")
    assert checkpoint_step(repo) == 4, out
    two_sessions = (repo / "models/sample-arith/model.safetensors").read_bytes()

    run(repo, "dvc", "exp", "run", "-S", "train.steps_today=4", "-S", "train.resume=never")
    assert checkpoint_step(repo) == 4
    assert (repo / "models/sample-arith/model.safetensors").read_bytes() == two_sessions


def test_push_clone_pull_and_continue_on_another_machine(repo, tmp_path):
    set_params(repo, {"train": {"steps_today": 1, "resume": "auto"}})
    run(repo, "dvc", "repro")
    step = checkpoint_step(repo)
    assert step == 5  # one step of the budget of 6 left for the other machine
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "session")
    run(repo, "dvc", "push")

    other = tmp_path / "other-machine"
    run(tmp_path, "git", "clone", "-q", str(repo), str(other))
    run(other, "dvc", "pull")
    assert checkpoint_step(other) == step
    run(other, "dvc", "exp", "run", "-S", "train.steps_today=1")
    assert checkpoint_step(other) == step + 1


def test_metrics_and_plots_show(repo):
    out = run(repo, "dvc", "metrics", "show")
    assert "outputs/live/metrics.json" in out and "outputs/eval/metrics.json" in out, out
    assert "eval.val_loss" in out and "eval.exact_match" in out and "val.loss" in out, out
    assert "records_read" not in out, out  # the render stage's counts are no metric
    readme = (REPO / "README.md").read_text()
    short = next(line for line in readme.splitlines() if line.startswith("dvc exp show --drop"))
    header = run(repo, *shlex.split(short), "--csv").splitlines()[0].split(",")
    assert header == ["Experiment", "Created", "eval.val_loss", "eval.exact_match", "train.loss", "val.loss", "step",
                      "train.lr", "train.schedule", "train.total_step_budget"], header
    run(repo, "dvc", "plots", "show")
    assert (repo / "dvc_plots/index.html").exists()
    assert 'src="static/workspace_outputs_live_loss.svg"' in (repo / "dvc_plots/index.html").read_text()


def test_exported_model_answers_through_a_transformers_pipeline(repo):
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(repo / "models/sample-arith"), device="cpu")
    result = generate("What is 2 + 3?", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("What is 2 + 3?")


KILL_RUN = {"total_step_budget": 150, "steps_today": 0, "save_every": 15, "eval_every": 50, "resume": "auto"}


def uninterrupted_weights(repo: Path, seed: int) -> bytes:
    """The run's final weights from one session started outside DVC, in folders of its own."""
    set_params(repo, {"train": {**KILL_RUN, "seed": seed, "checkpoint_dir": "reference", "out_dir": "reference-out"}})
    run(repo, sys.executable, "-m", "stages.train")
    weights = (repo / "reference/step-00000150/model.safetensors").read_bytes()
    for folder in ("reference", "reference-out", ".checkpoint-recovery"):
        shutil.rmtree(repo / folder)
    set_params(repo, {"train": {"checkpoint_dir": "checkpoints", "out_dir": "outputs"}})
    return weights


def killed(repo: Path, command: list[str], rng) -> None:
    """Start `command`, SIGKILL it and its stage process at a random moment after its session first saved."""
    saved = {p.name for p in (repo / ".checkpoint-recovery").glob("step-*")}
    process = subprocess.Popen(command, cwd=repo, env=command_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while ({p.name for p in (repo / ".checkpoint-recovery").glob("step-*")} <= saved and process.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.3))
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL, "the session ended before the kill"


def test_sigkill_under_dvc_repro_and_dvc_exp_run_then_again_ends_with_the_uninterrupted_weights(repo):
    expected = uninterrupted_weights(repo, seed=31)
    rng = random.Random(31)
    killed(repo, ["dvc", "repro"], rng)
    killed(repo, ["dvc", "exp", "run"], rng)  # which first restores the older checkpoint dvc.lock records
    run(repo, "dvc", "exp", "run")
    assert checkpoint_step(repo) == 150
    assert (repo / "checkpoints/step-00000150/model.safetensors").read_bytes() == expected
