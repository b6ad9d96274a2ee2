"""The repository as the session command (stages/session.py) sees it.

- `sh`: run a git or dvc command, printing it first (`$ git pull --ff-only`) and showing its output as it comes,
  with this Python's DVC and tools;
- `changed_files` and `belongs_to_dvc`: what git sees modified, and whether DVC wrote it (dvc.lock, a stage's output
  or metric, the `.gitignore` files DVC keeps, the sessions log), as opposed to a change of the user's;
- `recorded_data`: what `dvc pull` can bring: the stages dvc.lock records and the `.dvc` files;
- `set_train_values`: train.* values written into params.yaml in place, its comments and layout kept (a params.yaml
  changed only there, as an interrupted session leaves it, counts as the command's, not the user's);
- the sessions log, `<train.out_dir>/sessions.jsonl`: one line per session the command ran (date, machine, steps,
  time, push size and time, DVC's commit of the outputs, the evaluate stage's time), committed with it, so the next
  session on any machine knows what to keep back under a time limit.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from stages.lib.base.files import write_atomically

SESSIONS_LOG = "sessions.jsonl"
SESSION_KEYS = ("steps_today", "minutes_today")  # the train.* values the command writes into params.yaml
TEMPLATE = re.compile(r"\$\{([^}]+)\}")
TIMED_OUT = 124  # the return code of a command stopped at its timeout (as timeout(1) has it)
INTERRUPT_GRACE = 5  # seconds a command interrupted at its timeout has to stop before it is killed


def sh(*command: str, env: dict | None = None, quiet: bool = False, shown: str = "",
       timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run a command in the repository; its output goes to the terminal unless `quiet` (then it is captured).

    `shown`: how to print the command, when the real one is too long to read (a commit message). `timeout`: seconds
    after which the command and every process it started are interrupted (return code TIMED_OUT).
    """
    if not quiet:
        print(f"$ {shown or ' '.join(command)}", flush=True)
    # DVC, and the stages it runs, come from this Python's environment, whether or not it is activated: the day
    # stays one command (`.venv/bin/python -m stages.session`).
    tools = str(Path(sys.executable).parent)
    env = {**(os.environ if env is None else env)}
    env["PATH"] = f"{tools}{os.pathsep}{env.get('PATH', '')}"
    real = (sys.executable, "-m", "dvc", *command[1:]) if command[0] == "dvc" else command
    try:
        if timeout is not None:
            return _run_with_timeout(real, env, timeout)
        return subprocess.run(real, env=env, text=True, capture_output=quiet, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return subprocess.CompletedProcess(command, 127, "", f"{command[0]}: command not found\n")


def _run_with_timeout(command: tuple, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run `command` in a process group of its own; past `timeout`, interrupt the group as Ctrl-C would (DVC then
    releases its locks and leaves dvc.lock as it was), and kill it if it is still there after a grace period."""
    process = subprocess.Popen(command, env=env, text=True, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return subprocess.CompletedProcess(command, process.wait(timeout=max(timeout, 0.1)))
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGINT, INTERRUPT_GRACE), (signal.SIGKILL, None)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return subprocess.CompletedProcess(command, TIMED_OUT)


def output_of(*command: str) -> str | None:
    """What a quiet command prints, stripped; None when it fails."""
    done = sh(*command, quiet=True)
    return done.stdout.strip() if done.returncode == 0 else None


def changed_files(untracked: bool = False) -> list[str]:
    """Paths git reports as changed (staged or not), and with `untracked` the new files it does not ignore."""
    status = sh("git", "status", "--porcelain", f"--untracked-files={'all' if untracked else 'no'}", quiet=True)
    paths = []
    for line in status.stdout.splitlines():
        path = line[3:].split(" -> ")[-1]
        paths.append(path[1:-1] if path.startswith('"') else path)
    return paths


def pipeline_outputs(dvc_yaml: Path = Path("dvc.yaml"), params_yaml: Path = Path("params.yaml"),
                     stage: str | None = None) -> list[str]:
    """Every path dvc.yaml names as a stage output, metric or plot (of `stage` alone when given), with
    `${section.key}` filled in from params."""
    pipeline = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}
    params = yaml.safe_load(params_yaml.read_text(encoding="utf-8")) or {}
    names = []
    for name, entries in (pipeline.get("stages") or {}).items():
        if stage is not None and name != stage:
            continue
        for kind in ("outs", "metrics", "plots"):
            names += [next(iter(entry)) if isinstance(entry, dict) else entry for entry in entries.get(kind, [])]
    return [TEMPLATE.sub(lambda m: str(_lookup(params, m.group(1))), name).rstrip("/") for name in names]


def _lookup(params: dict, dotted: str):
    value = params
    for key in dotted.split("."):
        value = value.get(key, "") if isinstance(value, dict) else ""
    return value


def belongs_to_dvc(path: str, outputs: list[str], sessions_log: str) -> bool:
    """Whether a changed file is DVC's (or the sessions log) rather than a change of the user's."""
    if path in ("dvc.lock", sessions_log) or Path(path).name == ".gitignore":
        return True
    return any(path == out or path.startswith(out + "/") for out in outputs)


def recorded_data(lock: Path = Path("dvc.lock")) -> list[str]:
    """What DVC has recorded and can pull: the stages in dvc.lock and the `.dvc` files git tracks (raw data added
    with `dvc add`). A stage dvc.lock does not know yet has nothing to pull, and naming it would fail the pull."""
    stages = sorted(((yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}) if lock.is_file()
                    else [])
    tracked = output_of("git", "ls-files", "--", "*.dvc") or ""
    return stages + tracked.split()


def only_session_values_changed(params_yaml: str = "params.yaml", keys=SESSION_KEYS) -> bool:
    """Whether params.yaml differs from its last commit in nothing but the train.* `keys` the command sets."""
    committed = output_of("git", "show", f"HEAD:{params_yaml}")
    if committed is None:
        return False

    def without_keys(text: str) -> dict:
        params = yaml.safe_load(text) or {}
        for key in keys:
            (params.get("train") or {}).pop(key, None)
        return params
    return without_keys(committed) == without_keys(Path(params_yaml).read_text(encoding="utf-8"))


def set_train_values(text: str, values: dict) -> str:
    """params.yaml's text with the given train.* keys set, each on its own line, comments and alignment kept."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"train:\s*(#.*)?$", line)), None)
    if start is None:
        lines += ["train:\n"]
        start = len(lines) - 1
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"[^\s#]", lines[i])), len(lines))
    indent = next((re.match(r"\s+", lines[i]).group() for i in range(start + 1, end) if re.match(r"\s+\w", lines[i])),
                  "  ")
    for key, value in values.items():
        pattern = re.compile(rf"({re.escape(indent)}{re.escape(key)}:[ \t]*)([^#\n]*?)([ \t]*#.*)?(\r?\n)?$")
        for i in range(start + 1, end):
            found = pattern.match(lines[i])
            if found:
                head, old, comment, newline = found.groups()
                note = (comment or "").lstrip(" \t")
                width = len(old) + len(comment or "") - len(note)  # where the comment starts, kept
                padding = " " * max(1, width - len(str(value))) if note else ""
                lines[i] = f"{head}{value}{padding}{note}{newline or ''}"
                break
        else:
            lines.insert(start + 1, f"{indent}{key}: {value}\n")
            end += 1
    return "".join(lines)


def write_train_values(values: dict, params_yaml: Path = Path("params.yaml")) -> bool:
    """Set train.* values in params.yaml (a new file, never rewritten in place); whether anything changed."""
    text = params_yaml.read_text(encoding="utf-8")
    updated = set_train_values(text, values)
    if updated != text:
        write_atomically(params_yaml, updated)
    return updated != text


def read_sessions(log: Path) -> list[dict]:
    """The sessions log's records, oldest first (none when it does not exist)."""
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


def append_session(log: Path, record: dict) -> None:
    """Add one record to the sessions log (written as a new file)."""
    text = log.read_text(encoding="utf-8") if log.is_file() else ""
    write_atomically(log, text + json.dumps(record, sort_keys=True) + "\n")


def last_push_speed(records: list[dict], key: str = "push") -> float | None:
    """Bytes per second of the latest push the log measured (`key` "dvc_commit": of DVC's commit after the stage)."""
    for record in reversed(records):
        push = record.get(key) or {}
        if push.get("bytes") and push.get("seconds"):
            return push["bytes"] / push["seconds"]
    return None


def last_evaluate_seconds(records: list[dict]) -> tuple[float, bool] | None:
    """How long the latest evaluate stage the log measured took, and whether it finished (False: it was stopped at
    the command's time limit, so it takes longer)."""
    for record in reversed(records):
        if (record.get("evaluate") or {}).get("seconds"):
            return float(record["evaluate"]["seconds"]), bool(record["evaluate"].get("finished", True))
    return None


def update_last_session(log: Path, values: dict) -> None:
    """Add `values` to the log's latest record (written as a new file)."""
    records = read_sessions(log)
    records[-1].update(values)
    write_atomically(log, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))


def say(text: str) -> None:
    """A line of the session command's own, set apart from the commands' output."""
    print(f"\n== {text}", flush=True)
    sys.stdout.flush()
