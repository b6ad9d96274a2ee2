"""The summary a session prints when it ends: what it did to the run, in numbers a person reads.

    session summary: steps 400 -> 600 of 1000 (stopped by steps_today)
      tokens      409,600 this session, 1,228,800 in all
      train/loss  2.5120 -> 2.1010
      val/loss    2.6040 -> 2.2500
      time        3 min training, 0.930 s per step
      checkpoint  checkpoints/step-00000600 (14.2 MB)
      left        400 steps: 2 more sessions of this length
      see         dvc metrics show, dvc plots show, outputs/live/loss.svg

"Then" is the latest value logged up to the session's first step (for a new run: at step 1), "now" the latest
logged; the time per step is the mean of the session's steps after the first (which includes warm-up work). Pure
formatting apart from `read_losses`, which reads the DVCLive logs.
"""

from dataclasses import dataclass
from pathlib import Path

from stages.lib.checkpointing.live_logs import logged_rows
from stages.lib.training.deadline import duration
from stages.lib.training.session_plan import sessions_left


@dataclass(frozen=True)
class SessionNumbers:
    """What the summary is made of."""

    start_step: int
    end_step: int
    total_steps: int
    tokens_per_step: int
    step_seconds: tuple  # each step's wall time, in order
    stopped_by: str
    checkpoint: Path | None
    checkpoint_bytes: int
    losses: dict  # metric -> (then, now), either None when not logged
    live_dir: Path


def read_losses(live_dir: Path, start_step: int) -> dict:
    """`train/loss` and `val/loss` as (value at or before `start_step`, latest value)."""
    losses = {}
    for metric in ("train/loss", "val/loss"):
        rows = logged_rows(live_dir, metric)
        # A new run has nothing logged before its first step: that step's value is where it started.
        before = [value for step, value in rows if step <= max(start_step, 1)]
        losses[metric] = (before[-1] if before else None, rows[-1][1] if rows else None)
    return losses


def seconds_per_step(step_seconds: tuple) -> float | None:
    """The mean step time, leaving out the first step when there are others."""
    timed = step_seconds[1:] if len(step_seconds) > 1 else step_seconds
    return sum(timed) / len(timed) if timed else None


def summary_lines(n: SessionNumbers) -> list[str]:
    """The summary, one line per fact."""
    done, remaining = n.end_step - n.start_step, n.total_steps - n.end_step
    lines = [f"session summary: steps {n.start_step} -> {n.end_step} of {n.total_steps} (stopped by {n.stopped_by})",
             _row("tokens", f"{done * n.tokens_per_step:,} this session, {n.end_step * n.tokens_per_step:,} in all")]
    for metric, (then, now) in n.losses.items():
        if now is not None:
            lines.append(_row(metric, loss_text(now) if then is None else f"{loss_text(then)} -> {loss_text(now)}"))
    per_step = seconds_per_step(n.step_seconds)
    if per_step is not None:
        lines.append(_row("time", f"{duration(sum(n.step_seconds))} training, {per_step:.3f} s per step"))
    if n.checkpoint is not None:
        lines.append(_row("checkpoint", f"{n.checkpoint} ({n.checkpoint_bytes / 1e6:.1f} MB)"))
    if remaining > 0:
        sessions = sessions_left(remaining, done)
        lines.append(_row("left", f"{remaining} steps: {sessions} more session{'s' if sessions > 1 else ''} of "
                                  "this length"))
    else:
        lines.append(_row("left", "nothing: the budget is spent (raise train.total_step_budget to continue the run)"))
    lines.append(_row("see", f"dvc metrics show, dvc plots show, {Path(n.live_dir) / 'loss.svg'}"))
    return lines


def _row(name: str, text: str) -> str:
    return f"  {name:<11} {text}"


def loss_text(value: float | None) -> str:
    """A loss as the summary shows it (`-` when there is none)."""
    return "-" if value is None else f"{value:.4f}"
