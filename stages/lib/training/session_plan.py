"""The session plan, printed and logged once the first few steps are timed: seconds per step, when this session will
end and what ends it, how many more sessions of this length the budget needs, and what each session adds to DVC's
cache. Pure functions of numbers the session measures; no I/O.

Every session stores a new checkpoint (the trained tensors in fp32 and AdamW's two moments: 12 bytes per trained
parameter, all of them or a LoRA's adapters) and a new export (the weights again, or a LoRA's adapters) in DVC's
cache, and in the remote after `dvc push`, until `dvc gc` reclaims them.
"""

import math
import time
from dataclasses import dataclass

PLAN_AFTER_STEPS = 5  # steps timed before the plan is made (the first one, with its warm-up, is left out)


@dataclass(frozen=True)
class SessionPlan:
    """What the rest of this session and of the run will take, at the pace measured so far."""

    step: int  # the step the plan was made at
    seconds_per_step: float
    session_end: int  # the step this session is expected to stop at
    ends_by: str  # what stops it: budget | steps_today | minutes_today
    seconds_left: float  # until this session's last step is done
    total_steps: int
    sessions_after: int  # further sessions of this length the budget needs (0: this one finishes it)
    checkpoint_bytes: int
    export_bytes: int

    @property
    def cache_bytes_per_session(self) -> int:
        """What one session adds to DVC's cache: its checkpoint and its export."""
        return self.checkpoint_bytes + self.export_bytes


def stored_bytes(model, export: str = "merged") -> tuple[int, int]:
    """(checkpoint, export) bytes of a session of `model`: 12 bytes per trained parameter; the weights as held (a
    merged export, whose base is as big as it is held here), the adapters (`adapter`), or both (train.export)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    merged = frozen or 4 * trained  # a LoRA's merged export is the base's size
    return 12 * trained, {"merged": merged, "adapter": 4 * trained, "both": merged + 4 * trained}[export]


def export_seconds(save_seconds: float, checkpoint_bytes: int, export_bytes: int) -> float:
    """What the closing export may take, from the time a save took: an export writes at about the save's speed, so
    a bigger export takes longer in proportion (a LoRA's merged export, the base's size, against its adapters'
    checkpoint); a smaller one (a full fine-tune's export, a third of its checkpoint) is still given the save's time."""
    return save_seconds * max(1.0, export_bytes / max(1, checkpoint_bytes))


def plan_session(step: int, start: int, end: int, total: int, step_times: list[float], now: float,
                 deadline: float, reserve: float, checkpoint_bytes: int, export_bytes: int) -> SessionPlan:
    """The plan at `step` of a session that began at `start` and stops at `end` (steps_today / budget) or at the
    `deadline` (time.monotonic(); inf: none) less the `reserve` its closing eval, save and export need."""
    timed = step_times[1:] or step_times  # the first step carries the warm-up
    per_step = sorted(timed)[len(timed) // 2]
    session_end, ends_by = end, "budget" if end >= total else "steps_today"
    if math.isfinite(deadline):
        by_time = step + max(0, int((deadline - now - reserve) / per_step))
        if by_time < end:
            session_end, ends_by = by_time, "minutes_today"
    return SessionPlan(step, per_step, session_end, ends_by, (session_end - step) * per_step, total,
                       sessions_left(total - session_end, max(1, session_end - start)), checkpoint_bytes,
                       export_bytes)


def sessions_left(remaining_steps: int, steps_per_session: int) -> int:
    """Sessions as long as this one that the rest of the budget takes."""
    return math.ceil(remaining_steps / steps_per_session) if steps_per_session > 0 else 0


def plan_lines(plan: SessionPlan, wall_clock: float | None = None) -> list[str]:
    """The plan as printed."""
    at = time.strftime("%H:%M", time.localtime((wall_clock or time.time()) + plan.seconds_left))
    if plan.ends_by == "budget":
        outlook = f"it finishes the run's budget of {plan.total_steps} steps"
    else:
        more = f"{plan.sessions_after} more session{'s' if plan.sessions_after != 1 else ''}"
        outlook = f"the budget of {plan.total_steps} steps needs {more} of this length after it"
    limit = "" if plan.ends_by == "budget" else f", by train.{plan.ends_by}"
    return [f"session plan at step {plan.step}: {plan.seconds_per_step:.3g} s/step; this session ends at step "
            f"{plan.session_end} in about {_duration(plan.seconds_left)} (around {at}{limit}); {outlook}",
            f"each session adds about {_megabytes(plan.cache_bytes_per_session)} to DVC's cache (checkpoint "
            f"{_megabytes(plan.checkpoint_bytes)}, export {_megabytes(plan.export_bytes)}); `dvc gc` reclaims old "
            "ones"]


def plan_metrics(plan: SessionPlan) -> dict:
    """The plan's numbers for the logs."""
    return {"session/seconds_per_step": round(plan.seconds_per_step, 4),
            "session/sessions_after_this": plan.sessions_after,
            "session/cache_mb_per_session": round(plan.cache_bytes_per_session / 1e6, 1)}


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 10e6 else f"{n / 1e6:.1f} MB"
