"""Running a function over many items in worker processes, results in the items' order, memory bounded.

`ordered_map` keeps at most a few items per worker in flight, so a slow item never lets finished results pile up
behind it; with one worker it runs in this process, with no pool at all. Either way the results come in the order
of the items, so whatever is built from them is the same with any number of workers.
"""

import multiprocessing
import os
from collections import deque
from typing import Any, Callable, Iterable, Iterator

AHEAD = 2  # items in flight per worker


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
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(workers, initializer, initargs) as pool:
        pending = deque(pool.apply_async(fn, (item,)) for _, item in zip(range(workers * AHEAD), items))
        while pending:
            result = pending.popleft().get()
            for item in items:
                pending.append(pool.apply_async(fn, (item,)))
                break
            yield result
