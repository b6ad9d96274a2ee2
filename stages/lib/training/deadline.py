"""The machine's time limit, found by itself (`train.minutes_today: auto`), and the time kept back for the push.

Where the end of the session comes from, in this order:
1. `STEPWISE_DEADLINE`: an explicit end, as Unix seconds or an ISO 8601 time (`2026-12-01T18:30`, local time unless
   it names a zone), for any machine the rules below do not know;
2. SLURM (`SLURM_JOB_ID` set): the job's end time, `SLURM_JOB_END_TIME`, else the time left that `squeue` reports;
3. Kaggle (`KAGGLE_KERNEL_RUN_TYPE` set): a notebook session lasts at most 12 hours from its start;
4. Colab (`COLAB_RELEASE_TAG` or `COLAB_GPU` set): a VM lives at most 12 hours (free tier) from its start, often
   less (idle time-outs, usage limits): an upper bound, not a promise; set STEPWISE_DEADLINE for a tighter one.
A session's start is the start of the machine's first process (PID 1 of the container or VM).

Pushing after training (the session command, stages/session.py) takes time too: that command passes the last measured
push speed in `STEPWISE_PUSH_BYTES_PER_SECOND`, and the train stage keeps back the time to push the checkpoint and
the export at that speed (see `push_seconds`). So does DVC's commit of them after the stage (hashing and caching, at
the last measured speed, `STEPWISE_DVC_COMMIT_BYTES_PER_SECOND`) and what the command does after the push (commit,
git push, the evaluate stage: `STEPWISE_KEEP_BACK_SECONDS`). Under the command a number of minutes counts from the
command's start (`STEPWISE_COMMAND_STARTED`, Unix time), not the stage's: the pull and the stages before train are
inside the limit. Nothing here imports torch.
"""

import os
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from stages.lib.base.errors import UserError

DEADLINE_ENV = "STEPWISE_DEADLINE"
PUSH_SPEED_ENV = "STEPWISE_PUSH_BYTES_PER_SECOND"
COMMIT_SPEED_ENV = "STEPWISE_DVC_COMMIT_BYTES_PER_SECOND"
KEEP_BACK_ENV = "STEPWISE_KEEP_BACK_SECONDS"
STARTED_ENV = "STEPWISE_COMMAND_STARTED"
NOTEBOOK_HOURS = 12  # Kaggle's session limit (CPU and GPU notebooks) and Colab's longest VM lifetime (free tier)


@dataclass(frozen=True)
class TimeLimit:
    """When the machine stops this session (Unix time), and how that was found."""

    ends_at: float
    source: str

    def describe(self, now: float) -> str:
        """`SLURM job 42 (SLURM_JOB_END_TIME): ends at 14:05, in 3 h 58 min`."""
        return (f"{self.source}: ends at {datetime.fromtimestamp(self.ends_at):%Y-%m-%d %H:%M}, "
                f"in {duration(self.ends_at - now)}")


def find_time_limit(env: dict | None = None, now: float | None = None, proc: Path = Path("/proc"),
                    squeue=None) -> TimeLimit | None:
    """The session's time limit from the sources in the module docstring, or None when none of them applies.

    `env`, `now`, `proc` and `squeue` (a function: job id -> squeue's time left) stand in for the real ones in tests.
    """
    env = os.environ if env is None else env
    now = time.time() if now is None else now
    if env.get(DEADLINE_ENV):
        return TimeLimit(parse_deadline(env[DEADLINE_ENV]), DEADLINE_ENV)
    if env.get("SLURM_JOB_ID"):
        return slurm_limit(env, now, squeue or _squeue_time_left)
    for name, present in (("Kaggle session", "KAGGLE_KERNEL_RUN_TYPE" in env),
                          ("Colab VM", "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env)):
        if present:
            started = now - machine_age(proc)
            return TimeLimit(started + NOTEBOOK_HOURS * 3600,
                             f"{name} (at most {NOTEBOOK_HOURS} h from its start at "
                             f"{datetime.fromtimestamp(started):%H:%M})")
    return None


def parse_deadline(text: str) -> float:
    """STEPWISE_DEADLINE as Unix time: seconds, or an ISO 8601 time (naive: local time)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise UserError(f"{DEADLINE_ENV} = {text!r} is not a time; expected Unix seconds (1767200000) or an ISO "
                        "8601 time (2026-12-01T18:30, or with a zone: 2026-12-01T18:30+01:00)") from None


def slurm_limit(env: dict, now: float, squeue) -> TimeLimit | None:
    """The SLURM job's end: SLURM_JOB_END_TIME (Slurm 20.11 and later), else `squeue -o %L` (time left)."""
    job = env["SLURM_JOB_ID"]
    end = env.get("SLURM_JOB_END_TIME", "")
    if end.isdigit() and int(end) > 0:
        return TimeLimit(float(end), f"SLURM job {job} (SLURM_JOB_END_TIME)")
    left = parse_slurm_duration(squeue(job) or "")
    if left is None:
        return None
    return TimeLimit(now + left, f"SLURM job {job} (squeue: {duration(left)} left)")


def parse_slurm_duration(text: str) -> float | None:
    """Seconds in SLURM's `[days-]hours:minutes:seconds` (or `minutes:seconds`); None for UNLIMITED, NOT_SET..."""
    text = text.strip()
    days, _, clock = text.rpartition("-")
    parts = clock.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        return None
    seconds = 0
    for part in parts:
        seconds = seconds * 60 + int(part)
    return float(seconds + int(days or 0) * 86400)


def _squeue_time_left(job: str) -> str | None:
    try:
        done = subprocess.run(["squeue", "-h", "-j", job, "-o", "%L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def machine_age(proc: Path = Path("/proc")) -> float:
    """Seconds since the machine's first process (PID 1) started: the age of the container or VM."""
    uptime = float((proc / "uptime").read_text().split()[0])
    # Field 22 of /proc/1/stat is the start time in clock ticks after boot; the command name before it may hold
    # spaces, so count from the closing parenthesis.
    fields = (proc / "1" / "stat").read_text().rsplit(")", 1)[1].split()
    return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))


def session_minutes(minutes_today: float | str, push_bytes: float, elapsed: float = 0.0, env: dict | None = None,
                    now: float | None = None) -> tuple[float, str | None]:
    """`train.minutes_today` as the minutes the session may take, counted from the stage's start (`elapsed` seconds
    ago; 0: no limit), and a line saying how that was found (None when there is nothing to say).

    `auto` takes the machine's limit (`find_time_limit`); under the session command, the time a push of `push_bytes`
    takes is kept back from either. The session itself keeps back the time its closing save and export take.
    """
    env = os.environ if env is None else env
    now = time.time() if now is None else now
    push, after = push_seconds(push_bytes, env), after_stage_seconds(push_bytes, env)
    kept = f", keeping {duration(push)} back to push about {push_bytes / 1e6:,.1f} MB" if push else ""
    if after:
        kept += f"{', and' if push else ', keeping'} {duration(after)} back for DVC's commit and what follows it"
    if minutes_today == "auto":
        limit = find_time_limit(env, now)
        if limit is None:
            return 0.0, (f"train.minutes_today = auto: no time limit found ({DEADLINE_ENV}, SLURM, Kaggle or Colab): "
                         "training without one")
        seconds = limit.ends_at - now + elapsed - push - after
        note = f"time limit: {limit.describe(now)}{kept}"
    elif minutes_today and (push or after or env.get(STARTED_ENV)):
        before = max(0.0, now - float(env.get(STARTED_ENV) or now) - elapsed)  # the command's time before the stage
        seconds = minutes_today * 60 - push - after - before
        note = f"train.minutes_today = {minutes_today:g}{kept}"
        if before:
            note += f", {duration(before)} of it spent before the train stage started"
    else:
        return float(minutes_today), None
    return max(seconds, 0.001) / 60, f"{note}: training for at most {duration(seconds - elapsed)}, the save included"


def push_seconds(push_bytes: float, env: dict | None = None) -> float:
    """Time to keep back for pushing `push_bytes` under the session command (0 when not run by it)."""
    env = os.environ if env is None else env
    speed = float(env.get(PUSH_SPEED_ENV) or 0)
    return push_bytes / speed if speed > 0 else 0.0


def after_stage_seconds(push_bytes: float, env: dict | None = None) -> float:
    """Time to keep back under the session command for DVC's commit of `push_bytes` and the command's own steps
    after the push (0 when not run by it)."""
    env = os.environ if env is None else env
    speed = float(env.get(COMMIT_SPEED_ENV) or 0)
    return (push_bytes / speed if speed > 0 else 0.0) + float(env.get(KEEP_BACK_ENV) or 0)


def duration(seconds: float) -> str:
    """`3 h 58 min`, `12 min`, `40 s`."""
    seconds = max(0, round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min"
