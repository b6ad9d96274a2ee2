"""Session command: a day of training in one command, on whatever machine you have today.

    python -m stages.session --steps 1000        # or --minutes 90, or --minutes auto (the machine's own limit)

Run it in your clone of the project. Each step says what it does:
1. check the workspace: refuse when files other than DVC's outputs and lock have changes (commit yours first);
2. pull: `git pull --ff-only` when the branch tracks an upstream, `dvc pull` when DVC has a default remote, so the
   session continues from the last one, whichever machine ran it;
3. train: set train.steps_today / train.minutes_today in params.yaml (when given) and run `dvc repro`: one session
   of the train stage and whatever its results change, in the workspace (no experiment a day);
4. push the data: `dvc push`, timed (the speed is what later sessions keep time back for);
5. commit dvc.lock, params.yaml, the metrics and the sessions log with a message that summarises the session;
6. push the commit: `git push`.
DVC's data goes before git's commit, so the remote never holds a commit whose data it lacks. A failure stops the
command where it happened, leaves the steps after it undone and says how to finish by hand. Under a time limit
(`--minutes`, or train.minutes_today), the train stage keeps back the time the push takes: the checkpoint's size at
the last push's speed (stages/lib/training/deadline.py).
"""

import argparse
import os
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
from stages.lib.training.deadline import PUSH_SPEED_ENV, duration
from stages.lib.training.summary import loss_text, read_losses

GUESSED_PUSH_SPEED = 10e6  # bytes per second, until a push has been measured


class StepFailed(UserError):
    """A step that did not work; the message says what is done and how to finish by hand."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m stages.session", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help="steps to train today (train.steps_today; 0: until the budget "
                                                  "is spent); default: as params.yaml says")
    parser.add_argument("--minutes", help="time for today's training in minutes, or auto: the machine's limit "
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
    """Check, pull, train, push, commit and push: one session, as the module docstring says."""
    args = _parse_args(argv)
    day = Day(args)
    day.check_workspace()
    day.pull()
    day.train()
    day.push_data()
    day.commit()
    day.push_commit()
    ws.say("done" + (f": {day.summary.splitlines()[0]}" if day.summary else ""))


class Day:
    """One run of the command: what it found and did so far, for the next step and for the messages."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.upstream = self.remote = None
        self.summary = ""

    def check_workspace(self) -> None:
        """Refuse to start in anything but a clean clone of the project (DVC's own changes allowed)."""
        ws.say("1/6 checking the workspace")
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

    def pull(self) -> None:
        """Bring the last session here: git's commit, then DVC's data."""
        ws.say("2/6 pulling the last session")
        self.upstream = ws.output_of("git", "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}")
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
        """One session of the pipeline in the workspace."""
        ws.say("3/6 training: dvc repro")
        values = {key: value for key, value in (("steps_today", self.args.steps),
                                                ("minutes_today", self.args.minutes)) if value is not None}
        if values and ws.write_train_values(values):
            print("params.yaml: " + ", ".join(f"train.{k} = {v}" for k, v in values.items()))
        self.params = load_params()
        self.before = self._state()
        env = dict(os.environ)
        if self.remote:
            speed = ws.last_push_speed(ws.read_sessions(self.log))
            env[PUSH_SPEED_ENV] = str(speed or GUESSED_PUSH_SPEED)
            if self.params.train.minutes_today:  # only a time limit needs the push's time
                print(f"time kept back for the push: at {(speed or GUESSED_PUSH_SPEED) / 1e6:.1f} MB/s "
                      f"({'the last push' if speed else 'a guess, no push measured yet'})")
        began = time.monotonic()
        if ws.sh("dvc", "repro", env=env).returncode:
            raise StepFailed("dvc repro failed (see above): nothing was committed or pushed. Fix what it says and "
                             "run this again; training continues from the last checkpoint it saved")
        self.seconds = time.monotonic() - began
        self.after = self._state()

    def push_data(self) -> None:
        """Send the session's data to the DVC remote, timed."""
        ws.say("4/6 pushing the data: dvc push")
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
        ws.say("5/6 committing the session")
        records = ws.read_sessions(self.log)
        trained = self.after["step"] != self.before["step"]
        if trained:
            ws.append_session(self.log, {
                "session": len(records) + 1, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "host": socket.gethostname(), "steps": [self.before["step"], self.after["step"]],
                "total_steps": self.after["total"], "seconds": round(self.seconds, 1), "push": self.push})
        paths = self._session_files()
        if not paths:
            print("nothing to commit: the session changed nothing")
            return
        self.summary = self._message(len(records) + 1, trained)
        title = self.summary.split("\n")[0]
        if ws.sh("git", "add", "--", *paths).returncode or ws.sh(
                "git", "commit", "-q", "-m", self.summary, shown=f'git commit -m "{title}"').returncode:
            raise StepFailed(f"git commit failed (see above): the data is pushed. To finish by hand: "
                             f"{self._commit_by_hand()}")

    def push_commit(self) -> None:
        """Send the commit to git's remote."""
        ws.say("6/6 pushing the commit: git push")
        if self.upstream is None:
            print("no upstream branch: nothing pushed (set one once: git push -u origin main)")
            return
        ahead = ws.output_of("git", "rev-list", "--count", "@{u}..HEAD")
        if ahead == "0":
            print("nothing to push: the upstream branch has every commit")
        elif ws.sh("git", "push").returncode:
            raise StepFailed("git push failed (see above): the session is committed here and its data is pushed. "
                             "To finish by hand: git pull --rebase && git push")

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
        body = [f"Trained on {socket.gethostname()}; dvc repro took {duration(self.seconds)}.", *losses]
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


if __name__ == "__main__":
    run_stage(lambda: main(sys.argv[1:]))
