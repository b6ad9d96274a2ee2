"""Session command: a day of training in one command, on whatever machine you have today.

    python -m stages.session --steps 1000        # or --minutes 90, or --minutes auto (the machine's own limit)

Run it in your clone of the project. Each step says what it does:
1. check the workspace: refuse when files other than DVC's outputs and lock have changes (commit yours first);
2. take the lease: one session at a time per run, across machines (stages/lib/daily/lease.py): a second machine is
   refused at once, naming who trains and until when;
3. pull: `git pull --ff-only` when the branch tracks an upstream, `dvc pull` when DVC has a default remote, so the
   session continues from the last one, whichever machine ran it;
4. train: set train.steps_today / train.minutes_today in params.yaml (when given) and run `dvc repro train`: one
   session of the train stage and the stages before it, in the workspace (no experiment a day);
5. push the data: `dvc push`, timed (the speed is what later sessions keep time back for);
6. commit dvc.lock, params.yaml, the metrics and the sessions log with a message that summarises the session;
7. push the commit: `git push`; when the remote's branch has moved on meanwhile, the commit goes to a branch of its
   own, `sessions/<machine>-<time>`, and the message says how to continue either line of the run;
8. evaluate, the optional second part: `dvc repro -s evaluate`, then its results pushed, committed and pushed.
The session is on the remotes before anything optional runs, and DVC's data goes before git's commit, so the remote
never holds a commit whose data it lacks. A failure stops the command where it happened, leaves the steps after it
undone and says how to finish by hand.

A time limit (`--minutes N`, or train.minutes_today) bounds the whole command, from its start to its last push: the
train stage keeps back the push (the checkpoint's size at the last push's speed), DVC's commit of its outputs (at the
last measured speed), the git steps, and the evaluate stage (its last duration). Evaluate is skipped with a note when
its last run would not fit, and stopped when it overruns the time left (stages/lib/training/deadline.py).
"""

import argparse
import contextlib
import os
import re
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from stages.lib.base.errors import UserError, run_stage
from stages.lib.base.files import folder_size
from stages.lib.base.params import MODELS_DIR, load_params
from stages.lib.checkpointing import store
from stages.lib.daily import workspace as ws
from stages.lib.daily.lease import Lease
from stages.lib.training.deadline import (
    COMMIT_SPEED_ENV,
    KEEP_BACK_ENV,
    PUSH_SPEED_ENV,
    STARTED_ENV,
    duration,
    find_time_limit,
)
from stages.lib.training.summary import loss_text, read_losses

GUESSED_PUSH_SPEED = 10e6  # bytes per second, until a push has been measured
GUESSED_COMMIT_SPEED = 100e6  # bytes per second DVC hashes and caches the outputs, until measured
SECONDS_FOR_GIT = 5  # kept back for git add, commit, push and DVC's own start-up after a stage
STEPS = 8


class StepFailed(UserError):
    """A step that did not work; the message says what is done and how to finish by hand."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.session", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help="steps to train today (train.steps_today; 0: until the budget "
                                                  "is spent); default: as params.yaml says")
    parser.add_argument("--minutes", help="time for the whole command in minutes, or auto: the machine's limit "
                                          "(train.minutes_today); default: as params.yaml says")
    args = parser.parse_args(argv)
    if args.minutes not in (None, "auto"):
        try:
            args.minutes = float(args.minutes)
        except ValueError:
            parser.error(f"--minutes {args.minutes}: expected a number of minutes or auto")
    if args.steps is not None and args.steps < 0:
        parser.error("--steps must be 0 or more")
    return args


def main(argv: list[str] | None = None) -> None:
    """Check, lease, pull, train, push, commit and push, then evaluate: one session, as the module docstring says."""
    args = _parse_args(argv)
    day = Day(args)
    day.check_workspace()
    with day.leased():
        day.pull()
        day.train()
        day.push_data()
        day.commit()
        day.push_commit()
        day.evaluate()
    ws.say("done" + (f": {day.summary.splitlines()[0]}" if day.summary else ""))


class Day:
    """One run of the command: what it found and did so far, for the next step and for the messages."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.started = time.time()
        self.upstream = self.remote = self.git_remote = self.session_branch = None
        self.summary = ""
        self.number = None  # the session's number in the sessions log, once it has a record there

    def check_workspace(self) -> None:
        """Refuse to start in anything but a clean clone of the project (DVC's own changes allowed)."""
        ws.say(f"1/{STEPS} checking the workspace")
        top = ws.output_of("git", "rev-parse", "--show-toplevel")
        if top is None or not Path("dvc.yaml").is_file():
            raise UserError("run this in your clone of the project: its top folder, where dvc.yaml and params.yaml "
                            "are (git clone <url> && cd <folder>)")
        if Path(top).resolve() != Path.cwd().resolve():
            raise UserError(f"run this in the project's top folder, {top}")
        self.params = load_params()
        self.log = Path(self.params.train.out_dir) / ws.SESSIONS_LOG
        outputs = ws.pipeline_outputs()
        mine = [p for p in ws.changed_files() if not ws.belongs_to_dvc(p, outputs, str(self.log))
                and not (p == "params.yaml" and ws.only_session_values_changed())]
        if mine:
            raise UserError("these files have changes that are not DVC's: " + ", ".join(mine) + ". Commit them "
                            "first (git commit -am 'what changed'), or undo them (git checkout -- FILE), then run "
                            "this again; the session's commit records only the session")
        print("clean: no changes but DVC's outputs and lock")
        self.ends_at = self._command_end()

    @contextlib.contextmanager
    def leased(self):
        """Hold the run's lease in the git remote for the rest of the command (none without a remote)."""
        ws.say(f"2/{STEPS} taking the lease: one session at a time for this run")
        self.upstream = ws.output_of("git", "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}")
        branch = ws.output_of("git", "branch", "--show-current")
        self.git_remote = _git_remote(branch)
        if self.git_remote is None:
            print("no git remote: no lease, so nothing stops another clone from training this run at the same time")
            yield
            return
        lease, note = Lease.take(self.git_remote, branch or "HEAD", self.ends_at)
        print(note)
        lease.keep_alive()
        try:
            yield
        finally:
            print(lease.drop())

    def pull(self) -> None:
        """Bring the last session here: git's commit, then DVC's data."""
        ws.say(f"3/{STEPS} pulling the last session")
        if self.upstream is None:
            print("no upstream branch: not pulling from git (set one once: git push -u origin main)")
        elif ws.sh("git", "pull", "--ff-only").returncode:
            raise StepFailed("git pull failed (see above): nothing was trained. Resolve it (git status says how; if "
                             "another machine pushed a session meanwhile, keep theirs: git checkout -- dvc.lock), "
                             "then run this again")
        self.remote = ws.output_of("dvc", "remote", "default") or None
        targets = ws.recorded_data()
        if self.remote is None:
            print("no default DVC remote: not pulling data (see the README, Sharing and storage)")
        elif not targets:
            print("dvc.lock records no stage yet: no data to pull (this is the first session)")
        elif ws.sh("dvc", "pull", *targets).returncode:
            raise StepFailed("dvc pull failed (see above): nothing was trained. If the remote lacks files of the "
                             "last commit, its session's `dvc push` did not finish: push them from the machine that "
                             "has them (dvc push), then run this again")

    def train(self) -> None:
        """One session of the train stage (and the stages before it) in the workspace."""
        ws.say(f"4/{STEPS} training: dvc repro train")
        values = {key: value for key, value in (("steps_today", self.args.steps),
                                                ("minutes_today", self.args.minutes)) if value is not None}
        if values and ws.write_train_values(values):
            print("params.yaml: " + ", ".join(f"train.{k} = {v}" for k, v in values.items()))
        self.params = load_params()
        self.before = self._state()
        env = {**os.environ, **self._time_keeping()}
        began = time.monotonic()
        if ws.sh("dvc", "repro", "train", env=env).returncode:
            raise StepFailed("dvc repro train failed (see above): nothing was committed or pushed. Fix what it says "
                             "and run this again; training continues from the last checkpoint it saved")
        self.seconds = time.monotonic() - began
        self.after = self._state()
        self.dvc_commit = self._dvc_commit_measured()

    def _time_keeping(self) -> dict:
        """What the train stage keeps back under a time limit (see the module docstring), as its environment, and
        whether evaluate fits today (`self.evaluate_note`: why not)."""
        records = ws.read_sessions(self.log)
        push_speed = ws.last_push_speed(records) if self.remote else None
        commit_speed = ws.last_push_speed(records, "dvc_commit")
        last_evaluate = ws.last_evaluate_seconds(records)  # (seconds, whether it finished) or None
        self.evaluate_note = None
        keep = SECONDS_FOR_GIT
        if self.ends_at is not None:
            left = self.ends_at - time.time()
            evaluate = _evaluate_seconds_wanted(last_evaluate, left)
            if evaluate + SECONDS_FOR_GIT > left / 2:
                self.evaluate_note = (f"it needs about {duration(evaluate)}, more than half the {duration(left)} "
                                      "left for training, pushing and evaluating")
            else:
                keep += evaluate + SECONDS_FOR_GIT
        env = {COMMIT_SPEED_ENV: str(commit_speed or GUESSED_COMMIT_SPEED), KEEP_BACK_ENV: str(keep),
               STARTED_ENV: str(self.started)}
        if self.remote:
            env[PUSH_SPEED_ENV] = str(push_speed or GUESSED_PUSH_SPEED)
        if self.ends_at is not None or self.params.train.minutes_today:
            print((f"this command ends by {datetime.fromtimestamp(self.ends_at):%H:%M:%S}; " if self.ends_at else "")
                  + "kept back from training: "
                  + (f"the push at {(push_speed or GUESSED_PUSH_SPEED) / 1e6:.1f} MB/s "
                     f"({'the last push' if push_speed else 'a guess, no push measured yet'}), " if self.remote
                     else "")
                  + f"DVC's commit at {(commit_speed or GUESSED_COMMIT_SPEED) / 1e6:.1f} MB/s "
                  f"({'measured' if commit_speed else 'a guess'}), {duration(keep)} for the git steps"
                  + ("" if self.evaluate_note else " and the evaluate stage"), flush=True)
        return env

    def _dvc_commit_measured(self) -> dict | None:
        """How long DVC took to hash and cache the train stage's outputs: from the stage's closing note (written as
        it ended) to the end of `dvc repro`."""
        note = store.default_recovery_dir() / store.RECORDED_FILE
        if self.after["step"] == self.before["step"] or not note.is_file():
            return None
        seconds = time.time() - note.stat().st_mtime
        return {"bytes": self.after["bytes"], "seconds": round(seconds, 3)} if 0 < seconds < self.seconds else None

    def push_data(self) -> None:
        """Send the session's data to the DVC remote, timed."""
        ws.say(f"5/{STEPS} pushing the data: dvc push")
        self.push = None
        if self.remote is None:
            print("no default DVC remote: nothing pushed")
            return
        began = time.monotonic()
        if ws.sh("dvc", "push").returncode:
            raise StepFailed("dvc push failed (see above): the session trained, but nothing is committed or pushed. "
                             f"To finish by hand: dvc push && {self._commit_by_hand()}")
        if self.after["step"] != self.before["step"]:
            self.push = {"bytes": self.after["bytes"], "seconds": round(time.monotonic() - began, 3)}
            print(f"pushed about {self.push['bytes'] / 1e6:.1f} MB in {duration(self.push['seconds'])}")

    def commit(self) -> None:
        """Commit what the session changed, with a message that says what it did."""
        ws.say(f"6/{STEPS} committing the session")
        records = ws.read_sessions(self.log)
        trained = self.after["step"] != self.before["step"]
        if trained:
            self.number = len(records) + 1
            ws.append_session(self.log, {
                "session": self.number, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname(), "steps": [self.before["step"], self.after["step"]],
                "total_steps": self.after["total"], "seconds": round(self.seconds, 1), "push": self.push,
                "dvc_commit": self.dvc_commit})
        self.summary = self._message(len(records) + 1, trained)
        if not self._commit_changes(self.summary):
            print("nothing to commit: the session changed nothing")

    def _commit_changes(self, message: str, only: list[str] | None = None) -> bool:
        """Commit the session's files (those of them in `only`) with `message`; False when there is nothing to
        commit."""
        paths = [p for p in self._session_files() if only is None or p in only]
        if not paths:
            return False
        title = message.split("\n")[0]
        if ws.sh("git", "add", "--", *paths).returncode or ws.sh(
                "git", "commit", "-q", "-m", message, shown=f'git commit -m "{title}"').returncode:
            raise StepFailed(f"git commit failed (see above): the data is pushed. To finish by hand: "
                             f"{self._commit_by_hand()}")
        return True

    def push_commit(self, step: str = f"7/{STEPS} pushing the commit: git push") -> None:
        """Send the commit to git's remote; to a branch of its own when the remote's branch has moved on."""
        if step:
            ws.say(step)
        if self.upstream is None:
            print("no upstream branch: nothing pushed (set one once: git push -u origin main)")
            return
        if self.session_branch:  # this session's line already lives on its own branch
            if ws.sh("git", "push", self.git_remote, f"HEAD:refs/heads/{self.session_branch}").returncode:
                raise StepFailed(f"git push failed (see above): push it by hand: git push {self.git_remote} "
                                 f"HEAD:refs/heads/{self.session_branch}")
            return
        ahead = ws.output_of("git", "rev-list", "--count", "@{u}..HEAD")
        if ahead == "0":
            print("nothing to push: the upstream branch has every commit")
        elif ws.sh("git", "push").returncode:
            self._push_to_own_branch()

    def _push_to_own_branch(self) -> None:
        """git push was refused: put the session on a branch of its own and say how to continue either line."""
        remote = self.git_remote or "origin"
        branch = f"sessions/{_ref_safe(socket.gethostname())}-{datetime.now():%Y%m%d-%H%M%S}"
        print(f"git push was refused: the remote's branch has moved on. Pushing this session to {branch} instead")
        if ws.sh("git", "push", remote, f"HEAD:refs/heads/{branch}").returncode:
            raise StepFailed(f"git push was refused, and so was a push to a branch of its own (see above): the "
                             f"session is committed only here, its data is on the DVC remote. Before this machine "
                             f"goes: git push {remote} HEAD:refs/heads/{branch}")
        self.session_branch = branch
        ws.sh("git", "fetch", "-q", remote, quiet=True)
        upstream_branch = self.upstream.split("/", 1)[1]
        theirs = ws.output_of("git", "rev-parse", "--short", "@{u}") or self.upstream
        title = ws.output_of("git", "log", "-1", "--format=%s", "@{u}") or ""
        mine = self.summary.splitlines()[0] if self.summary else "no training"
        ws.say(f"the run has two lines now; nothing is lost (this session's data is on the DVC remote):\n"
               f"- {self.upstream} ({theirs}: {title}): another session, pushed while this one ran\n"
               f"- {remote}/{branch}: this session ({mine})\n"
               "Continue one line; never merge them (two sessions' dvc.lock and checkpoints cannot be combined).\n"
               f"To continue the other session's line (this one stays on {branch}):\n"
               f"    git fetch {remote} && git reset --hard {self.upstream} && dvc pull\n"
               f"To continue this session's line instead (the other one is kept on a branch of its own):\n"
               f"    git push {remote} {theirs}:refs/heads/sessions/replaced-{theirs} && "
               f"git push --force-with-lease={upstream_branch}:{theirs} {remote} HEAD:{upstream_branch}")

    def evaluate(self) -> None:
        """The evaluate stage, the optional second part, within the time left; its results committed and pushed."""
        ws.say(f"8/{STEPS} evaluating: dvc repro -s evaluate (optional: the session is already on the remotes)")
        left = None if self.ends_at is None else self.ends_at - time.time() - SECONDS_FOR_GIT
        if self.evaluate_note or (left is not None and left < 2 * ws.INTERRUPT_GRACE):
            print(f"evaluate skipped today: {self.evaluate_note or 'no time left'}. Run it later: dvc repro evaluate")
            return
        outputs = ws.pipeline_outputs(stage="evaluate")
        stamps = _stamps(outputs)
        began = time.monotonic()
        done = ws.sh("dvc", "repro", "-s", "evaluate", timeout=None if left is None else left - ws.INTERRUPT_GRACE)
        seconds = round(time.monotonic() - began, 1)
        if done.returncode == ws.TIMED_OUT:
            self._evaluate_stopped(outputs, seconds, left)
            return
        if done.returncode:
            raise StepFailed("dvc repro -s evaluate failed (see above): the session itself is committed and pushed. "
                             "Fix what it says, then: dvc repro evaluate")
        if self.number is not None and _stamps(outputs) != stamps:  # it ran (not skipped as unchanged): timed
            ws.update_last_session(self.log, {"evaluate": {"seconds": seconds}})
        if self.remote and ws.sh("dvc", "push").returncode:
            raise StepFailed("dvc push of the evaluate stage's results failed (see above): the session itself is "
                             "committed and pushed. To finish by hand: dvc push && git commit -am 'Evaluated' && "
                             "git push")
        title = f"Session {self.number}: evaluated" if self.number else "Evaluated"
        if self._commit_changes(f"{title} the model at step {self.after['step']}"):
            self.push_commit(step="")

    def _evaluate_stopped(self, outputs: list[str], seconds: float, left: float) -> None:
        """Evaluate overran the time left and was stopped: put its last results back, and log how long it ran (a
        lower bound that later sessions keep back, or skip evaluate for)."""
        print(f"evaluate stopped: it did not finish in the {duration(left)} left. Its last results stay as they "
              "were; run it later: dvc repro evaluate")
        # DVC removed its outputs before running it, the stage may have written some, and DVC may even have
        # recorded them as the interrupt came: back to the committed dvc.lock, metrics and outputs.
        changed = (ws.output_of("git", "ls-files", "--modified", "--", "dvc.lock", *outputs) or "").split()
        if changed:
            ws.sh("git", "checkout", "--", *changed, quiet=True)
        ws.sh("dvc", "checkout", "-q", "--force", "evaluate", quiet=True)
        if self.number is not None:
            ws.update_last_session(self.log, {"evaluate": {"seconds": seconds, "finished": False}})
            if self._commit_changes(f"Session {self.number}: evaluate stopped after {duration(seconds)}, out of time",
                                    only=[str(self.log)]):
                self.push_commit(step="")

    def _command_end(self) -> float | None:
        """When the command must be done (Unix time): the start plus --minutes, the machine's limit for auto."""
        minutes = self.args.minutes if self.args.minutes is not None else self.params.train.minutes_today
        if minutes == "auto":
            limit = find_time_limit()
            return limit.ends_at if limit else None
        return self.started + float(minutes) * 60 if minutes else None

    def _state(self) -> dict:
        """The run as the workspace holds it: the latest checkpoint's step, the losses, the sizes a push sends."""
        train = self.params.train
        found = store.find(Path(train.checkpoint_dir), Path(train.checkpoint_dir)).checkpoints
        step = found[0].step if found else 0
        sizes = [folder_size(found[0].path) if found else 0, folder_size(MODELS_DIR / train.model_name)]
        return {"step": step, "total": found[0].state["total_steps"] if found else None, "bytes": sum(sizes),
                "losses": read_losses(Path(train.out_dir) / "live", step)}

    def _message(self, number: int, trained: bool) -> str:
        """The commit message: the steps and losses in the first line, the rest below."""
        before, after = self.before, self.after
        if not trained:
            return f"Session {number}: no training (steps {after['step']} of {after['total']}); outputs updated"
        losses = [f"{name} {loss_text(before['losses'][name][0])} -> {loss_text(after['losses'][name][1])}"
                  for name in ("train/loss", "val/loss") if after["losses"][name][1] is not None]
        head = f"Session {number}: steps {before['step']} -> {after['step']} of {after['total']}"
        body = [f"Trained on {socket.gethostname()}; dvc repro train took {duration(self.seconds)}.", *losses]
        if self.push:
            body.append(f"Pushed about {self.push['bytes'] / 1e6:.1f} MB in {duration(self.push['seconds'])}.")
        return "\n\n".join([head, "\n".join(body)])

    def _session_files(self) -> list[str]:
        """What the session's commit holds: params.yaml (its steps and minutes) and whatever DVC changed."""
        outputs = ws.pipeline_outputs()
        return [p for p in ws.changed_files(untracked=True)
                if p == "params.yaml" or ws.belongs_to_dvc(p, outputs, str(self.log))]

    def _commit_by_hand(self) -> str:
        return (f"git add -- {' '.join(self._session_files())} && git commit -m 'Session: steps {self.before['step']} "
                f"-> {self.after['step']}' && git push")


def _git_remote(branch: str | None) -> str | None:
    """The remote the lease lives in: the current branch's upstream remote, else `origin`, else the only one."""
    configured = ws.output_of("git", "config", f"branch.{branch}.remote") if branch else None
    if configured and configured != ".":
        return configured
    remotes = (ws.output_of("git", "remote") or "").split()
    return "origin" if "origin" in remotes else (remotes[0] if len(remotes) == 1 else None)


def _evaluate_seconds_wanted(last: tuple[float, bool] | None, left: float) -> float:
    """The time to keep back for the evaluate stage: its last duration; twice as long as it ran when it was stopped
    at its time limit; before any measure, a tenth of the time left (20 s to 10 min), after which it is stopped."""
    if last is None:
        return min(max(left / 10, 20.0), 600.0)
    seconds, finished = last
    return seconds if finished else 2 * seconds


def _stamps(paths: list[str]) -> dict:
    """Each file's modification time (None when absent): whether a stage wrote them."""
    return {p: Path(p).stat().st_mtime_ns if Path(p).exists() else None for p in paths}


def _ref_safe(name: str) -> str:
    """A machine's name as a part of a branch name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "machine"


if __name__ == "__main__":
    run_stage(lambda: main(sys.argv[1:]))
