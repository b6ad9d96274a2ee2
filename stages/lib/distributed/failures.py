"""A failure on one training process stops every process within moments, its message shown once, by rank 0.

Without it, a process that fails (a UserError, or a CUDA out-of-memory error turned into memory advice, when its GPU
is shared) ends alone, and the others wait inside a collective for it until the collective timeout (30 minutes).

Why not a flag in the loop's per-step all_reduce: a process fails wherever its error strikes, typically in a forward
or backward pass, while the others already wait in that step's gradient all_reduce. They never reach the next
per-step collective, and a failed process joining a collective the others are not in pairs it with theirs (gloo
mixes up the buffers; nccl hangs). So the failure travels beside the collectives, through torchrun's rendezvous store
(a small key-value server every process is connected to):
- the failing process writes its rank and message under one key (the first failure wins), then waits a few seconds
  for rank 0 to say it has shown it, and exits with 1 (the message printed by itself only if rank 0 never did);
- every process watches that key from a thread (a cheap check a few times a second); on rank 0 the watcher prints the
  message, names the process, marks it shown; then every watcher ends its process at once with exit code 1 (under
  the stage's own launcher: the code goes to the launcher, see launcher.py). A process blocked in a collective cannot
  finish its step or save, so the checkpoint of the last save is the one the next session resumes from.
"""

import json
import os
import sys
import threading
from datetime import timedelta

from stages.lib.distributed.launcher import exit_code_to_report

POLL_SECONDS = 0.2
SHOWN_WAIT = timedelta(seconds=10)  # how long a failed process waits for rank 0 to show its message


def _key(name: str) -> str:
    # One key per torchrun attempt: a restarted group does not see the previous attempt's failure.
    attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
    return f"stepwise/{attempt}/{name}"


class FailureWatch:
    """This process's link to the others' failures: post its own, and stop when another process posts one."""

    def __init__(self, rank: int, store):
        self.rank, self.store = rank, store
        self._lock = threading.Lock()  # one store client, used by the watcher thread and the failing main thread
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="failure-watch", daemon=True)

    @classmethod
    def connect(cls, rank: int) -> "FailureWatch | None":
        """A watch on torchrun's store (MASTER_ADDR / MASTER_PORT), or None when there is none to reach."""
        import torch.distributed as dist
        host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not host or not port:
            return None
        return cls(rank, dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=60)))

    def start(self) -> "FailureWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (the session is over, or this process reports its own failure)."""
        self._done.set()

    def report(self, message: str) -> bool:
        """Tell the others this process failed with `message`; whether rank 0 showed it (rank 0 shows its own: the
        caller prints it)."""
        self.stop()
        with self._lock:
            self.store.compare_set(_key("failure"), "", json.dumps({"rank": self.rank, "message": message}))
            if self.rank == 0:
                self.store.set(_key("shown"), "1")
                return False
            try:
                self.store.wait([_key("shown")], SHOWN_WAIT)
            except Exception:  # rank 0 is gone or stuck elsewhere: this process prints its message itself
                return False
        return True

    def mark_shown(self) -> None:
        """Rank 0 printed the failure: the failed process need not."""
        with self._lock:
            self.store.set(_key("shown"), "1")

    def _watch(self) -> None:
        while not self._done.wait(POLL_SECONDS):
            with self._lock:
                if self._done.is_set() or not self.store.check([_key("failure")]):
                    continue
                failure = json.loads(self.store.get(_key("failure")))
            self._stop_this_process(failure)

    def _stop_this_process(self, failure: dict) -> None:
        if self.rank == 0:
            print(f"\nerror (on process {failure['rank']}): {failure['message']}\nevery process stopped: a "
                  "session after this one resumes from the last saved checkpoint", file=sys.stderr, flush=True)
            self.mark_shown()
        sys.stdout.flush()
        os._exit(exit_code_to_report(1))  # the main thread may be blocked in a collective: nothing else ends it
