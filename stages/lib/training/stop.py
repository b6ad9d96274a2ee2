"""Stopping a session early, cleanly: SIGTERM or Ctrl-C finishes the current step, then the session saves a
checkpoint and exits with 128 + the signal number; a second Ctrl-C stops at once (checkpoints are written
atomically, so the previous one stays usable). In a multi-process run the death of the launcher is a stop request
too, and every process stops after the same step (the session all-reduces the flags before each step)."""

import os
import signal
import sys
import time

from stages.lib.distributed.launcher import launcher_gone


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps; a second signal acts at once.

    `repeat_window`: in a multi-process run one signal can reach a worker twice within moments (from a scheduler,
    then again from a launcher passing it on); a repeat within that many seconds is the same request.
    `launcher_pid`: the death of the launcher that started this worker is a request too (taken as SIGHUP).
    """

    def __init__(self, repeat_window: float = 0.0, launcher_pid: int | None = None):
        self.signal: int | None = None
        self.repeat_window, self.launcher_pid = repeat_window, launcher_pid
        self._received_at = 0.0
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def received(self) -> int:
        """The signal number asking to stop, or 0."""
        if self.signal is None and launcher_gone(self.launcher_pid):
            self.signal = signal.SIGHUP
            print("\nthe launcher is gone: finishing this step, then saving a checkpoint and stopping",
                  file=sys.stderr, flush=True)
        return self.signal or 0

    def _handle(self, signum, frame):
        if self.signal is None:
            self.signal, self._received_at = signum, time.monotonic()
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping",
                  file=sys.stderr, flush=True)
        elif time.monotonic() - self._received_at >= self.repeat_window:
            self._act_at_once(signum, frame)

    def _act_at_once(self, signum, frame):
        previous = self._previous[signum]
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)  # Python's own SIGINT handler: KeyboardInterrupt
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)
