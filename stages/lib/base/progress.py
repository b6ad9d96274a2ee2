"""How a training session shows its progress: a progress bar on a terminal, plain lines in a file.

On a terminal (stderr is a TTY) a tqdm bar shows the session's steps, loss and speed. Written to a file (nohup, a
cluster job's log, CI), a bar is one endless line of carriage returns, so instead a plain line is printed every
`train.log_every` steps and at the session's last step:

    step 120/1000: train/loss 2.3456, lr 2.90e-03, 12,345 tokens/s

Events (a validation loss, a checkpoint saved) are one line each in both cases, printed as they happen. The other
stages' bars (render, tokenize, evaluate) come from `bar`: on a terminal only, since each of those stages ends with
a summary line.
"""

import sys

from tqdm import tqdm


class Progress:
    """The session's progress display; use it as a context manager around the loop."""

    def __init__(self, start: int, end: int, total: int, log_every: int, enabled: bool = True,
                 terminal: bool | None = None):
        self.end, self.total, self.log_every, self.enabled = end, total, log_every, enabled
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = (tqdm(total=end - start, desc=f"steps {start}->{end}", unit="step", dynamic_ncols=True)
                    if enabled and terminal else None)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def step(self, step: int, loss: float, lr: float, tokens_per_sec: float) -> None:
        """Step `step` is done."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            self.bar.update()
        elif self.enabled and (step % self.log_every == 0 or step == self.end):
            print(step_line(step, self.total, loss, lr, tokens_per_sec), flush=True)

    def event(self, text: str) -> None:
        """One line about something that happened (a validation loss, a save), without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)


def bar(iterable=None, disable: bool = False, **options) -> tqdm:
    """A tqdm bar on stderr when it is a terminal; in a file none (a log of carriage returns helps nobody)."""
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, disable=disable or not sys.stderr.isatty(), **options)


def step_line(step: int, total: int, loss: float, lr: float, tokens_per_sec: float) -> str:
    """The plain log line of one step."""
    return f"step {step}/{total}: train/loss {loss:.4f}, lr {lr:.2e}, {tokens_per_sec:,.0f} tokens/s"
