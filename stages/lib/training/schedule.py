"""Budget and learning-rate arithmetic: pure functions of step numbers, no I/O.

Steps are counted over the whole run (all sessions together). `step` below is the 0-based index of an optimizer
update; after update `step` the run has made `step + 1` updates, which is what checkpoints and logs call the step.

Learning-rate schedules (`train.schedule`), both defined over the whole run so that sessions change nothing:
- `cosine`: linear warmup to `lr` over `warmup_steps`, then a cosine decay reaching `min_lr` at the last step;
- `wsd` (warmup, stable, decay): linear warmup, then `lr` held constant, then a linear decay over the last
  `decay_steps` updates (`train.decay_steps`, or `train.decay_fraction` of the run) reaching `min_lr` at the last step.

Changing the run's length (raising `total_step_budget`): the updates made so far keep the learning rates they had.
`stable_steps` counts the leading updates whose learning rate does not depend on the length (the warmup for
cosine; the warmup and the stable phase for wsd), so a checkpoint taken within them continues exactly, as if the new
length had been set from the start; `agrees_until` says how far two schedules give the same rates. Past that point a
schedule is re-planned (`replanned`): from the checkpoint's step the learning rate starts where it was and follows the
schedule's shape over the remaining steps (cosine: from that value down to min_lr; wsd: held at that value, then
the decay over the last decay steps). A Schedule is a JSON-ready record, kept in every checkpoint's state.json.
"""

import math
from dataclasses import asdict, dataclass, replace

SCHEDULES = ("cosine", "wsd")


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


@dataclass(frozen=True)
class Restart:
    """Where a schedule was re-planned: from update `step` on, the rate starts at `lr` (what the run had reached).

    `stable_steps`: the leading updates of the run before it whose rate did not depend on the run's length.
    """

    step: int
    lr: float
    stable_steps: int


@dataclass(frozen=True)
class Schedule:
    """The learning rate of every update of a run."""

    kind: str  # cosine | wsd
    total_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    decay_steps: int = 0  # wsd: updates in the final decay
    restart: Restart | None = None

    @classmethod
    def planned(cls, kind: str, total: int, lr: float, min_lr: float, warmup_steps: int, decay_steps: int = 0,
                decay_fraction: float = 0.2) -> "Schedule":
        """The schedule params.yaml asks for; wsd decays over `decay_steps`, or (0) `decay_fraction` of the run."""
        if kind not in SCHEDULES:
            raise ValueError(f"unknown schedule {kind!r}")
        decay = 0
        if kind == "wsd":
            decay = max(1, min(total, decay_steps if decay_steps > 0 else round(decay_fraction * total)))
        return cls(kind, total, lr, min_lr, warmup_steps, decay)

    def lr_at(self, step: int) -> float:
        """Learning rate of update `step`."""
        if self.restart is None and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        start, peak = (self.restart.step, self.restart.lr) if self.restart else (self.warmup_steps, self.lr)
        if self.kind == "wsd":
            begin = self.decay_start
            if step < begin or begin >= self.total_steps:
                return peak
            return peak + (self.min_lr - peak) * min(1.0, (step - begin + 1) / (self.total_steps - begin))
        span = self.total_steps - 1 - start
        if span <= 0:
            return peak
        progress = min(1.0, max(0.0, (step - start) / span))
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - self.min_lr)

    @property
    def decay_start(self) -> int:
        """wsd: the first update of the final decay (the steps before it hold the rate constant)."""
        first = self.restart.step if self.restart else self.warmup_steps
        return max(first, self.total_steps - self.decay_steps)

    @property
    def pre_decay_step(self) -> int | None:
        """wsd: the step whose checkpoint a longer run can continue from exactly, kept until the next one; None for
        cosine and when the decay starts with the run."""
        if self.kind != "wsd" or not 0 < self.decay_start < self.total_steps:
            return None
        return self.decay_start

    @property
    def stable_steps(self) -> int:
        """The leading updates whose learning rate is the same whatever the run's length."""
        if self.restart is not None:
            return self.restart.stable_steps
        return self.decay_start if self.kind == "wsd" else self.warmup_steps

    def replanned(self, step: int, lr: float, stable_steps: int) -> "Schedule":
        """This schedule continuing from update `step` at rate `lr` (see the module docstring)."""
        return replace(self, restart=Restart(step, lr, min(stable_steps, step)))

    def without_restart(self) -> "Schedule":
        """The schedule as params.yaml planned it."""
        return replace(self, restart=None)

    def describe(self) -> str:
        """A few words for messages: `wsd, decay over steps 800..1000`."""
        if self.kind == "wsd":
            shape = f"wsd, decay over steps {self.decay_start}..{self.total_steps}"
        else:
            shape = f"cosine to min_lr at step {self.total_steps}"
        if self.restart:
            shape += f", from {self.restart.lr:.3g} at step {self.restart.step}"
        return shape

    def as_json(self) -> dict:
        """JSON-ready form, as state.json keeps it."""
        return asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> "Schedule":
        """Inverse of as_json."""
        restart = value.get("restart")
        return cls(**{**value, "restart": Restart(**restart) if restart else None})


def agrees_until(a: Schedule, b: Schedule) -> float:
    """How many leading updates get the same learning rate under both schedules (math.inf: all of them)."""
    if a == b:
        return math.inf
    if a.kind != b.kind or a.restart != b.restart:
        return min(a.stable_steps, b.stable_steps)
    # Same shape and the same history, another length or decay: they part where the length starts to matter.
    if a.kind == "wsd":
        return min(a.decay_start, b.decay_start)
    return a.restart.step if a.restart else a.warmup_steps


def time_for_another_step(now: float, deadline: float, step_seconds: float, reserve_seconds: float) -> bool:
    """Whether one more step, then the closing work (`reserve_seconds`: eval, save, export), ends before `deadline`."""
    return now + step_seconds + reserve_seconds <= deadline
