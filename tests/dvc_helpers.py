"""The real git and dvc commands in temporary repositories made from this project, for the end-to-end tests."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.daily.workspace import SESSIONS_LOG, belongs_to_dvc, pipeline_outputs

REPO = Path(__file__).resolve().parents[1]
SKIP_PARTS = {"tests", "bench", ".venv"}

needs_dvc = pytest.mark.skipif(shutil.which("dvc") is None and not (Path(sys.executable).parent / "dvc").exists(),
                               reason="needs the dvc command (pip install -r requirements.txt)")


def command_env() -> dict:
    """The environment a user's shell would give: this Python's tools first, nothing of the test process's."""
    env = {**os.environ, "DVC_STUDIO_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": "",
           "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "GIT_TERMINAL_PROMPT": "0"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def run(cwd: Path, *args: str, ok: bool = True) -> str:
    """Run a command in a test repository; fail with its output when it fails (unless not `ok`)."""
    proc = subprocess.run(args, cwd=cwd, env=command_env(), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    output = proc.stdout + proc.stderr
    if ok:
        assert proc.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def project_files() -> list[str]:
    """The project's files as a fresh clone holds them: its sources, also ones not committed yet, without the tests
    and benchmarks, and without what running the pipeline here wrote (a user runs the demo, then the tests)."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    # What the pipeline and the session command write, as the session command tells it: dvc.yaml's outputs,
    # dvc.lock, the sessions log (but the output folders' .gitignore files ship).
    outputs = pipeline_outputs(REPO / "dvc.yaml", REPO / "params.yaml")
    sessions_log = f"{yaml.safe_load((REPO / 'params.yaml').read_text())['train']['out_dir']}/{SESSIONS_LOG}"
    return [f for f in listed if Path(f).parts[0] not in SKIP_PARTS and (REPO / f).is_file()
            and (Path(f).name == ".gitignore" or not belongs_to_dvc(f, outputs, sessions_log))]


def set_params(repo: Path, changes: dict) -> None:
    """Change params.yaml values (section -> key -> value; nested dicts update nested sections)."""
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in changes.items():
        for key, value in values.items():
            if isinstance(value, dict):
                params[section][key].update(value)
            else:
                params[section][key] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def new_project(repo: Path, dvc_remote: Path, params: dict) -> Path:
    """A git repository holding this project with `params`, its DVC remote at `dvc_remote`, committed."""
    for name in project_files():
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, repo / name)
    set_params(repo, params)
    run(repo, "git", "init", "-q", "-b", "main")
    configure_git(repo)
    run(repo, "dvc", "remote", "modify", "storage", "url", str(dvc_remote))
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "project")
    return repo


def configure_git(repo: Path) -> None:
    """Who commits, as every machine sets once."""
    run(repo, "git", "config", "user.email", "test@example.com")
    run(repo, "git", "config", "user.name", "test")


def checkpoint_step(repo: Path) -> int:
    """The step of the one checkpoint in the repository's checkpoints/."""
    states = sorted((repo / "checkpoints").glob("step-*/state.json"))
    assert len(states) == 1, f"expected exactly one checkpoint, found {states}"
    return json.loads(states[0].read_text())["step"]
