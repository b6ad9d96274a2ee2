"""One session at a time per run, across machines: a lease kept in the git remote.

Two machines training the same run at once fork it: both continue from the same checkpoint, and only one line can
be the branch's. So before it pulls, the session command (stages/session.py) takes the branch's lease: the ref
`refs/stepwise/lease/<branch>` in the remote the branch pulls from (a run is a branch: other branches train other
runs, each with a lease of its own), a commit holding no files whose message is a small JSON
record: the machine, its process, the branch, when the session started, when it is expected to end (its time limit,
when it has one) and when the lease expires. Every change is a compare-and-swap push
(`git push --force-with-lease=<ref>:<the lease as read> <remote> <new>:<ref>`): of two
machines racing for it, one wins and the other is refused, naming who holds it and until when.

While the session runs, the lease is renewed every few minutes (each renewal moves its expiry `TTL` ahead); the
command drops it when it ends, whether the session worked or not. A machine that died stops renewing: once its lease
has expired, the next session takes it over and says so; so does a session on the same machine once the holder's
process is gone (a killed command). Only the daily command takes the lease: `dvc repro` or `dvc exp run` by hand is
not held back by it. A project with no git remote has no lease.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from stages.lib.base.errors import UserError
from stages.lib.daily import workspace as ws

REF = "refs/stepwise/lease"  # + /<branch>
TTL = 20 * 60  # seconds a lease lasts without renewal: a machine silent this long is taken for dead
RENEW_EVERY = 5 * 60
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's empty tree: the lease commit holds no files


class LeaseHeld(UserError):
    """Another session of this run holds the lease: nothing was done."""


@dataclass(frozen=True)
class Holder:
    """Who holds the lease (times as Unix seconds)."""

    machine: str
    pid: int
    branch: str
    started: float
    expected_end: float | None
    expires: float

    def to_text(self) -> str:
        record = asdict(self)
        for key in ("started", "expected_end", "expires"):
            record[key] = _iso(record[key])
        return json.dumps(record, sort_keys=True)

    @classmethod
    def from_text(cls, text: str) -> Holder | None:
        """The holder a lease commit's message names; None when it is not a lease this code wrote."""
        try:
            record = json.loads(text)
            return cls(str(record["machine"]), int(record["pid"]), str(record.get("branch", "")),
                       _unix(record["started"]), _unix(record["expected_end"]), _unix(record["expires"]))
        except (ValueError, KeyError, TypeError):
            return None

    def describe(self) -> str:
        """`gpu-box (process 4242, branch main) since 2026-12-05 07:40, expected to end at 09:10`."""
        end = (f"expected to end at {_clock(self.expected_end)}" if self.expected_end
               else "with no time limit (it ends when its steps are done)")
        return f"{self.machine} (process {self.pid}, branch {self.branch}) since {_clock(self.started)}, {end}"

    def dead(self, now: float) -> str | None:
        """Why this holder's session is over though its lease is still there, or None while it may be running."""
        if self.expires <= now:
            return f"its lease expired at {_clock(self.expires)} (not renewed: the machine stopped or died)"
        if self.machine == socket.gethostname() and not _process_runs(self.pid):
            return f"its process {self.pid} on this machine is gone"
        return None


class Lease:
    """The lease this session holds in `remote` (see the module docstring)."""

    def __init__(self, remote: str, holder: Holder, commit: str):
        self.remote, self.holder, self.commit = remote, holder, commit
        self.ref = ref_for(holder.branch)
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost: str | None = None  # why a renewal failed: another machine took the lease over

    @classmethod
    def take(cls, remote: str, branch: str, expected_end: float | None, now: float | None = None) -> tuple[Lease, str]:
        """Take the lease in `remote`, or raise LeaseHeld naming its holder; the lease and a line saying what
        happened (a lease taken over from a dead session says whose)."""
        now = time.time() if now is None else now
        ref = ref_for(branch)
        old, holder = read(remote, ref)
        note = f"took the lease ({ref} in {remote})"
        if holder is not None:
            why = holder.dead(now)
            if why is None:
                raise LeaseHeld(_held_message(remote, ref, holder))
            note = f"took over the lease ({ref} in {remote}) of {holder.describe()}: {why}"
        elif old:
            note = f"took over {ref} in {remote}, which held no lease of this command's ({old[:12]})"
        mine = Holder(socket.gethostname(), os.getpid(), branch, now, expected_end, now + TTL)
        commit = _lease_commit(mine)
        if not _swap(remote, ref, old, commit):
            _, winner = read(remote, ref)  # another machine took it a moment before
            raise LeaseHeld(_held_message(remote, ref, winner) if winner else
                            f"could not take the lease {ref} in {remote} (git push refused it, see above); nothing "
                            "was done. Check that you can push to the remote, then run this again")
        return cls(remote, mine, commit), note

    def renew(self, now: float | None = None) -> bool:
        """Move the expiry `TTL` ahead; False (and `lost` says why) when another session has taken the lease."""
        now = time.time() if now is None else now
        holder = Holder(**{**asdict(self.holder), "expires": now + TTL})
        commit = _lease_commit(holder)
        if _swap(self.remote, self.ref, self.commit, commit):
            self.holder, self.commit = holder, commit
            return True
        _, other = read(self.remote, self.ref)
        self.lost = f"held by {other.describe()}" if other else "gone from the remote"
        return False

    def keep_alive(self, every: float = RENEW_EVERY) -> None:
        """Renew the lease in the background until `drop`."""
        def renew_until_dropped():
            while not self._stop.wait(every):
                if not self.renew():
                    print(f"warning: the lease {self.ref} in {self.remote} was taken over ({self.lost}): another "
                          "machine may be training this run now", flush=True)
                    return
        self._renewer = threading.Thread(target=renew_until_dropped, name="lease renewal", daemon=True)
        self._renewer.start()

    def drop(self) -> str:
        """Give the lease back (unless another session has taken it over); a line saying what happened."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.lost:
            return f"the lease was taken over meanwhile ({self.lost}): left as it is"
        if _swap(self.remote, self.ref, self.commit, ""):
            return f"dropped the lease ({self.ref} in {self.remote})"
        return (f"could not drop the lease {self.ref} in {self.remote} (see above): it expires by itself at "
                f"{_clock(self.holder.expires)}")


def ref_for(branch: str) -> str:
    """The lease's ref for a branch's run."""
    return f"{REF}/{branch}"


def read(remote: str, ref: str) -> tuple[str, Holder | None]:
    """The lease commit at `ref` in `remote` ("" when there is none) and who it names."""
    listed = ws.sh("git", "ls-remote", "--exit-code", remote, ref, quiet=True)
    if listed.returncode == 2:  # the remote has no lease
        return "", None
    if listed.returncode:
        raise UserError(f"git ls-remote {remote} failed: {(listed.stderr or '').strip() or 'no answer'}. Nothing was "
                        f"done: check that this machine reaches the remote (git fetch {remote}), then run this again")
    fetched = ws.sh("git", "fetch", "-q", "--no-tags", remote, f"+{ref}:{ref}", quiet=True)
    commit = ws.output_of("git", "rev-parse", "--verify", "-q", ref) if fetched.returncode == 0 else None
    if not commit:
        raise UserError(f"could not fetch the lease {ref} from {remote}: {(fetched.stderr or '').strip()}")
    return commit, Holder.from_text(ws.output_of("git", "log", "-1", "--format=%B", commit) or "")


def _lease_commit(holder: Holder) -> str:
    """A commit holding no files whose message is the holder's record (not on any branch)."""
    env = {**os.environ, "GIT_AUTHOR_NAME": "stepwise lease", "GIT_AUTHOR_EMAIL": "lease@stepwise",
           "GIT_COMMITTER_NAME": "stepwise lease", "GIT_COMMITTER_EMAIL": "lease@stepwise"}
    done = ws.sh("git", "commit-tree", EMPTY_TREE, "-m", holder.to_text(), env=env, quiet=True)
    if done.returncode:
        raise UserError(f"git commit-tree failed: {done.stderr.strip()}")
    return done.stdout.strip()


def _swap(remote: str, ref: str, old: str, new: str) -> bool:
    """Point the remote's `ref` at `new` ("" deletes it) only if it still points at `old` ("": absent)."""
    return ws.sh("git", "push", "-q", f"--force-with-lease={ref}:{old}", remote, f"{new}:{ref}",
                 quiet=True).returncode == 0


def _held_message(remote: str, ref: str, holder: Holder) -> str:
    return (f"another session of this run is training on {holder.describe()}; its lease ({ref} in {remote}) is "
            f"renewed while it runs and lapses at {_clock(holder.expires)} if that machine stops. Two sessions at "
            "once would fork the run, so nothing was done here: run this again once it has pushed (git pull shows "
            "its commit). If that machine is gone for good, drop its lease: git push "
            f"{remote} :{ref}")


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="seconds")


def _unix(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()


def _clock(seconds: float) -> str:
    """Local time, with the date when it is not today's."""
    moment = datetime.fromtimestamp(seconds)
    return f"{moment:%H:%M}" if moment.date() == datetime.now().date() else f"{moment:%Y-%m-%d %H:%M}"
