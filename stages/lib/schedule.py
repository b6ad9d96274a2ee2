"""Budget and learning-rate arithmetic: pure functions of step numbers, no I/O.

Steps are counted over the whole run (all sessions together). `step` below is the 0-based index of an optimizer
update; after update `step` the run has made `step + 1` updates, which is what checkpoints and logs call the step.
"""

import math


def total_steps(total_step_budget: int, epochs: int, windows_per_epoch: int, samples_per_step: int) -> int:
    """Optimizer steps the whole run makes.

    `total_step_budget > 0` is taken as is. Otherwise the run makes `epochs` passes over the training windows,
    rounded UP to whole steps: every window is seen at least `epochs` times, and the last step may take a few
    windows from the start of the next epoch's order.
    """
    if total_step_budget > 0:
        return total_step_budget
    return max(1, math.ceil(epochs * windows_per_epoch / samples_per_step))


def session_end(start_step: int, total: int, steps_today: int) -> int:
    """The step this session stops at: `steps_today` more steps (0: no limit), never past the whole budget."""
    if steps_today <= 0:
        return total
    return min(total, start_step + steps_today)


def lr_at(step: int, total: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Learning rate of update `step`: linear warmup to `lr`, then cosine decay reaching `min_lr` at the last step.

    Defined over the whole budget, so a run split into sessions follows the same curve as one long session.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = total - 1 - warmup_steps
    if decay_steps <= 0:
        return lr
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def time_for_another_step(now: float, deadline: float, step_seconds: float, reserve_seconds: float) -> bool:
    """Whether one more step, then the closing work (`reserve_seconds`: eval, save, export), ends before `deadline`."""
    return now + step_seconds + reserve_seconds <= deadline
