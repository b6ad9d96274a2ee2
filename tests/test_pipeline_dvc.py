"""The daily workflow end to end, with the real `dvc` CLI in a temporary git repository made from this one.

The tests in this file share one repository and run in order: each continues where the previous one left it, as a
user's days do. Tiny params keep the whole file to a few minutes on 2 cores.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_PARAMS = {
    "tokenizer": {"vocab_size": 320},
    "train": {
        "model": {"n_layer": 1, "hidden_size": 32, "n_head": 2, "max_position_embeddings": 64},
        "seq_len": 32, "batch_size": 4, "warmup_steps": 1, "total_step_budget": 6, "steps_today": 2,
        "save_every": 100, "eval_every": 2, "eval_batches": 2,
    },
    "evaluate": {"max_val_tokens": 2048, "num_prompts": 4, "max_new_tokens": 6},
}
SKIP_PARTS = {"tests", "bench", ".venv"}

pytestmark = pytest.mark.skipif(shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc").exists(),
                                reason="needs the dvc command (pip install -r requirements.txt)")


def run(cwd: Path, *args: str) -> str:
    """Run a command in the test repository; fail with its output when it fails."""
    env = {**os.environ, "DVC_STUDIO_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": ""}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def project_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    return [f for f in listed if Path(f).parts[0] not in SKIP_PARTS and (REPO / f).is_file()]


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def checkpoint_step(repo: Path) -> int:
    states = sorted((repo / "checkpoints").glob("step-*/state.json"))
    assert len(states) == 1, f"expected exactly one checkpoint, found {states}"
    return json.loads(states[0].read_text())["step"]


def ran(output: str, stage: str) -> bool:
    return f"Running stage '{stage}'" in output


def skipped(output: str, stage: str) -> bool:
    return f"Stage '{stage}' didn't change, skipping" in output


def new_repository(repo: Path) -> Path:
    """A git repository at `repo` holding this project's files, with the tiny params, not yet committed."""
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    set_params(repo, TINY_PARAMS)
    run(repo, "git", "init", "-q", "-b", "main")
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "git", "config", "user.name", "test")
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    repo, remote = new_repository(root / "project"), root / "remote"
    run(repo, "dvc", "remote", "modify", "storage", "url", str(remote))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "project")
    return repo


def test_first_repro_runs_every_stage(repo):
    out = run(repo, "dvc", "repro")
    for stage in ("render", "tokenizer", "tokenize", "train", "evaluate"):
        assert ran(out, stage), out
    assert checkpoint_step(repo) == 2
    assert (repo / "models/sample-arith/model.safetensors").exists()
    assert "val_loss" in json.loads((repo / "outputs/eval/metrics.json").read_text())


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
    assert "val_loss" in out and "exact_match" in out, out
    run(repo, "dvc", "plots", "show")
    assert (repo / "dvc_plots/index.html").exists()


def test_exported_model_answers_through_a_transformers_pipeline(repo):
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(repo / "models/sample-arith"), device="cpu")
    result = generate("What is 2 + 3?", max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith("What is 2 + 3?")
