"""Running a function over many items in worker processes, results in the items' order, memory bounded.

`ordered_map` keeps at most a few items per worker in flight, so a slow item never lets finished results pile up
behind it; with one worker it runs in this process, with no pool at all. Either way the results come in the order
of the items, so whatever is built from them is the same with any number of workers.

A worker that dies without returning (the kernel's OOM killer sends SIGKILL) raises WorkerDied at once, naming the
item it was working on and how it ended, instead of waiting forever for its result.
"""

import multiprocessing
import os
import signal
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Any, Callable, Iterable, Iterator

AHEAD = 2  # items in flight per worker


class WorkerDied(Exception):
    """A worker process ended while it had an item (`item`: its number among the items, from 0; None: unknown)."""

    def __init__(self, item: int | None, exitcode: int | None):
        self.item, self.exitcode = item, exitcode
        super().__init__(f"a worker process {self.how()} while working on item {item}")

    def how(self) -> str:
        """How the process ended, in words: 'was killed by SIGKILL', 'exited with code 1'."""
        if self.exitcode is None:
            return "ended abruptly"
        if self.exitcode < 0:
            try:
                return f"was killed by {signal.Signals(-self.exitcode).name}"
            except ValueError:
                return f"was killed by signal {-self.exitcode}"
        return f"exited with code {self.exitcode}"


def available_cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ordered_map(fn: Callable[[Any], Any], items: Iterable, workers: int, initializer: Callable[..., None],
                initargs: tuple = ()) -> Iterator:
    """fn(item) for each item, in order, computed by `workers` processes set up by initializer(*initargs)."""
    items = iter(items)
    if workers <= 1:
        initializer(*initargs)
        yield from map(fn, items)
        return
    # fork where there is one: a worker starts in milliseconds, with the parent's imports already done.
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # Per worker: its process id and the number of the item it is working on, to name the item of one that dies.
    doing = context.Array("q", [0] * (2 * workers))
    pool = ProcessPoolExecutor(workers, context, _start_worker, (doing, initializer, initargs))
    try:
        numbered = enumerate(items)
        pending = deque(pool.submit(_run, fn, number, item) for number, item in islice(numbered, workers * AHEAD))
        while pending:
            result = pending.popleft().result()
            for number, item in islice(numbered, 1):
                pending.append(pool.submit(_run, fn, number, item))
            yield result
    except BrokenProcessPool:  # from result(), or from submit() once the pool knows
        raise _death(pool, doing) from None
    finally:  # on an error, the items not started are dropped; the ones running finish first
        pool.shutdown(wait=True, cancel_futures=True)


_doing: Any = None  # in a worker: the shared table of what each worker does
_slot = -1  # in a worker: its row in that table


def _start_worker(doing: Any, initializer: Callable[..., None], initargs: tuple) -> None:
    global _doing, _slot
    with doing.get_lock():
        _slot = next(i for i in range(0, len(doing), 2) if doing[i] == 0)
        doing[_slot], doing[_slot + 1] = os.getpid(), -1
    _doing = doing
    initializer(*initargs)


def _run(fn: Callable[[Any], Any], number: int, item: Any) -> Any:
    _doing[_slot + 1] = number
    return fn(item)


def _death(pool: ProcessPoolExecutor, doing: Any) -> WorkerDied:
    """Which worker died first, on which item, and how (the pool stops the others with SIGTERM after)."""
    # The pool keeps its processes in _processes, the only place that holds their exit codes. A process killed a
    # moment ago may not be waitable yet: look again for a little while.
    processes, deadline, ended = dict(getattr(pool, "_processes", None) or {}), time.monotonic() + 5, []
    while time.monotonic() < deadline:
        ended = [(pid, p.exitcode) for pid, p in processes.items() if p.exitcode is not None]
        ended.sort(key=lambda pair: pair[1] == -signal.SIGTERM)  # a SIGTERM is most likely the pool's own
        if ended and ended[0][1] != -signal.SIGTERM:
            break
        time.sleep(0.02)
    pid, exitcode = ended[0] if ended else (None, None)
    rows = {doing[i]: doing[i + 1] for i in range(0, len(doing), 2)}
    item = rows.get(pid)
    return WorkerDied(item if item is not None and item >= 0 else None, exitcode)
