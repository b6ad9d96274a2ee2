"""The training loop of one session: steps, validation, checkpoints, logs, and when to stop.

The session runs a Decision (stages/lib/training/decision.py) and decides nothing itself: it trains from the decision's
step until `train.steps_today` / `train.minutes_today` / the budget says stop, or a signal does
(stages/lib/training/stop.py), evaluating every `eval_every` and saving every `save_every` steps, where a wsd decay
begins (the checkpoint a longer budget continues from) and at the end. Progress shows as a bar on a terminal and as
plain lines in a file (stages/lib/base/progress.py); each validation loss and save prints a line as it happens.

In a multi-process run every process runs it in step: each trains on its slice of the data, all of them evaluate
(the same batches) and take part in saving; rank 0 alone logs and writes. The loss is a mean over the counted tokens
of all processes, so the gradient is the one a single process would compute for the same global batch.
"""

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stages.lib.base.params import TrainParams
from stages.lib.base.progress import Progress
from stages.lib.checkpointing import parts as ckpt
from stages.lib.checkpointing import store
from stages.lib.checkpointing.live_logs import open_live
from stages.lib.distributed.parallel import full_value
from stages.lib.modeling import memory
from stages.lib.modeling.precision import SETTLING_STEPS, LossScaler, Precision, gives_up, overflow_message
from stages.lib.modeling.preference_loss import metrics_from
from stages.lib.tokenizing.batches import Samples, TrainBatches, counted_tokens, validation_batches
from stages.lib.training.decision import Decision
from stages.lib.training.optimizers import set_learning_rate
from stages.lib.training.schedule import Schedule, time_for_another_step
from stages.lib.training.session_plan import (
    PLAN_AFTER_STEPS,
    export_seconds,
    plan_lines,
    plan_metrics,
    plan_session,
    stored_bytes,
)
from stages.lib.training.stop import StopRequest

SAVE_BYTES_PER_SECOND = 100e6  # a cautious disk speed, to reserve time for a save before one has been timed


@dataclass
class SessionResult:
    """How a session went: the steps it covered and why it stopped."""

    start_step: int
    end_step: int
    stopped_by: str = "budget"  # budget | steps_today | time | signal | nothing-to-do | fp16-overflow
    exit_code: int = 0
    first_step_at: float | None = None  # time.monotonic() when the first step ended (startup benchmarks)

    @property
    def trained(self) -> bool:
        """Whether the session made steps and ended in a way that calls for an export."""
        return self.end_step > self.start_step and self.stopped_by in ("budget", "steps_today", "time")


@dataclass
class SessionTimer:
    """Wall-clock bookkeeping for `minutes_today`: the longest recent step, and the closing work's cost."""

    deadline: float
    guesses: dict  # seconds each piece of closing work (eval when there is validation, save, export) may take
    step_times: list = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # the same pieces' seconds, once timed

    def reserve(self) -> float:
        """Seconds to keep for the closing work: each piece as measured (with a 20% margin), else as guessed."""
        return sum(self.measured[k] * 1.2 if k in self.measured else guess for k, guess in self.guesses.items())

    def allows_step(self) -> bool:
        """Whether one more step still leaves time for the closing eval, save and export."""
        if math.isinf(self.deadline):
            return True
        step = max(self.step_times[-5:], default=0.0)
        return time_for_another_step(time.monotonic(), self.deadline, step, self.reserve())


class _NoLogs:
    """Stands in for DVCLive on the processes other than rank 0, which log nothing."""

    step = 0
    summary: dict = {}

    def log_metric(self, *args, **kwargs) -> None:
        """Nothing: rank 0 logs."""

    def make_summary(self) -> None:
        """Nothing: rank 0 logs."""


class Session:
    """One session's loop over a prepared model and optimizer (`trainee`)."""

    def __init__(self, train: TrainParams, decision: Decision, trainee: ckpt.Trainee, precision: Precision,
                 batches: TrainBatches, val_samples: Samples | None, started: float, recovery_dir: Path):
        self.train, self.decision, self.trainee, self.precision = train, decision, trainee, precision
        self.plan, self.world, self.parallel = decision.plan, trainee.world, trainee.parallel
        self.schedule = Schedule.from_json(decision.plan.schedule)
        self.model, self.optimizer, self.device = trainee.parallel.model, trainee.optimizer, trainee.world.device
        self.scaler = trainee.scaler or LossScaler(enabled=False, device_type=self.device.type)
        self.batches, self.recovery_dir = batches, recovery_dir
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # eval_batches counts batches of the run's global batch, which every session keeps (a session with another
        # batch_size makes it up with grad_accum): the same samples in every session, scored batch_size at a time.
        self.val = (validation_batches(val_samples, train.eval_batches * batches.samples_per_step, train.batch_size)
                    if val_samples else [])
        # A preference sample is a pair: two rows (chosen, rejected) of seq_len tokens.
        self.tokens_per_step = batches.samples_per_step * train.seq_len * (1 if train.objective == "sft" else 2)
        self.stored = stored_bytes(self.model, train.export)  # (checkpoint, export) bytes this session writes
        self.timer = SessionTimer(started + train.minutes_today * 60 if train.minutes_today else math.inf,
                                  self._closing_guesses())
        self.last_saved: dict | None = None  # rank 0's parts as captured by the latest save
        self.last_state: dict | None = None  # and its state.json
        self.progress: Progress | None = None
        self.memory_plan: memory.MemoryPlan | None = None  # the plan printed before the first step, if any
        self.preference: dict = {}  # the latest step's rewards (train.objective dpo or orpo)

    def _closing_guesses(self) -> dict:
        # Before they are timed: a checkpoint writes the trained tensors and two Adam moments, an export the weights.
        checkpoint, export = self.stored
        guesses = {"save": checkpoint / SAVE_BYTES_PER_SECOND + 1.0, "export": export / SAVE_BYTES_PER_SECOND + 1.0}
        return {**guesses, "eval": 1.0} if self.val else guesses

    def run(self, start: int, end: int) -> SessionResult:
        """Train steps start -> end (or until stopped), saving and logging on the way."""
        result = SessionResult(start, start, stopped_by="steps_today" if end < self.plan.total_steps else "budget")
        main = self.world.is_main
        if self._should_stop(None, check_time=True)[1]:
            if main:
                print(f"the session's time limit ({self.train.minutes_today:.1f} min, train.minutes_today) leaves "
                      "no time for a step and a save: nothing trained")
            result.stopped_by = "time"
            return result
        live = open_live(self.trainee.live_dir, start if start > 0 else None) if main else _NoLogs()
        facts = self.batches.samples.facts()  # the same all run: in metrics.json, not plotted per step
        live.summary["data"] = {"padding_share": round(facts["padding_share"], 4),
                                "documents_split": facts["documents_split"]}
        saved = evaluated = step = start
        skipped_before = skipped_at_settling = self.scaler.skipped_steps
        gave_up = None
        stop = StopRequest(repeat_window=1.0 if self.world.size > 1 else 0.0, launcher_pid=self.world.launcher_pid)
        self.progress = Progress(start, end, self.plan.total_steps, self.train.log_every, enabled=main)
        with stop, self.progress:
            while True:
                signum, out_of_time = self._should_stop(stop, check_time=step < end)
                if signum or out_of_time or step >= end:
                    break
                loss, grad_norm, seconds = self.step(step)
                step += 1
                result.first_step_at = result.first_step_at or time.monotonic()
                self.timer.step_times.append(seconds)
                self._log_step(live, step, loss, grad_norm, seconds)
                if main and step - start == min(PLAN_AFTER_STEPS, end - start):
                    self._report_plan(live, step, start, end)
                self.progress.step(step, loss, self.optimizer.param_groups[0]["lr"], self.tokens_per_step / seconds)
                if step % self.train.eval_every == 0:
                    evaluated = self._evaluate(live, step)
                if step % self.train.save_every == 0 or step == self.schedule.pre_decay_step:
                    saved = self._save(step, live)
                if step - start == SETTLING_STEPS:
                    skipped_at_settling = self.scaler.skipped_steps
                # The same on every process: a step is skipped for the norm of all the gradients.
                gave_up = gives_up(self.scaler.skipped_in_a_row, step - start,
                                   self.scaler.skipped_steps - skipped_at_settling) if self.scaler.enabled else None
                if gave_up:
                    break
        result.end_step = step
        if signum:
            result.stopped_by, result.exit_code = "signal", 128 + signum
        elif gave_up:
            result.stopped_by, result.exit_code = "fp16-overflow", 1
        elif out_of_time:
            result.stopped_by = "time"
            if main:
                print(f"stopping at step {step}: the session's time limit ({self.train.minutes_today:.1f} min, "
                      "train.minutes_today) is nearly used up")
        if main and self.scaler.enabled:
            print(self.scaler.describe(step - start, skipped_before))
        if step > start and result.stopped_by != "signal" and evaluated != step:
            self._evaluate(live, step)
        live.make_summary()
        if step > start and saved != step:
            self._save(step, live)
        if gave_up and main:
            print(f"error: {overflow_message(gave_up, step)}", file=sys.stderr, flush=True)
        return result

    def _should_stop(self, stop: StopRequest | None, check_time: bool) -> tuple[int, bool]:
        """(signal number or 0, out of time), the same on every process: a signal to any process stops them all,
        and rank 0's clock alone decides the time (clocks and step times differ between processes)."""
        signum = stop.received() if stop else 0
        out_of_time = check_time and self.world.is_main and not self.timer.allows_step()
        signum, out_of_time = self.world.max([signum, float(out_of_time)])
        return int(signum), bool(out_of_time)

    def step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step (all its micro-batches); returns the loss, gradient norm and seconds taken."""
        began = time.perf_counter()
        batches = self.batches.step_batches(step)
        # The loss is a mean over the counted tokens of the whole global batch, every process's included.
        counted = max(1, int(self.world.sum(counted_tokens(batches))))
        on_device = [batch.to(self.device) for batch in batches]  # copies queued up front
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(on_device):
            with self.parallel.gradient_sync(last_micro_step=i == len(on_device) - 1):
                with self.precision.autocast():
                    loss_sum = self.parallel.forward(*batch.arguments())
                self.scaler.scale(loss_sum / counted).backward()
            total += loss_sum.detach()
        self.scaler.unscale(self.optimizer)  # fp16: gradients at their true size before clipping and the norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.world.size > 1:
            # DDP and FSDP average the gradients over the processes: times their number that is the sum, the
            # gradient one process would get for the whole global batch. Scaling here, not the loss, keeps a
            # process's backward pass at one process's magnitudes, so fp16 overflows where one process would.
            for p in params:
                p.grad.mul_(self.world.size)
        if self.train.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        grad_norm = full_value(grad_norm)
        lr = self.schedule.lr_at(step)
        set_learning_rate(self.optimizer, lr)
        self.scaler.step(self.optimizer, grad_norm)  # fp16: skipped for an inf or nan gradient; the batch is used
        self.optimizer.zero_grad(set_to_none=True)
        loss, grad_norm = (self.world.sum_tensor(total) / counted).item(), grad_norm.item()
        self.preference = self._preference_metrics()
        return loss, grad_norm, time.perf_counter() - began

    def _preference_metrics(self) -> dict:
        """The rewards summed by a preference objective since last asked, over every process (else nothing)."""
        take = getattr(self.parallel.module, "take_metrics", None)
        sums = take() if take else None
        return metrics_from(self.world.sum_tensor(sums)) if sums is not None else {}

    def _log_step(self, live, step: int, loss: float, grad_norm: float, seconds: float) -> None:
        live.step = step
        for name, value in (("train/loss", loss), ("grad_norm", grad_norm)):
            if math.isfinite(value):  # fp16 can skip a step for an inf norm: JSON has no inf, skipped_steps counts it
                live.log_metric(name, value)
        live.log_metric("lr", self.optimizer.param_groups[0]["lr"])
        for name, value in self.preference.items():
            live.log_metric(f"train/{name}", value)
        if self.scaler.enabled:
            live.log_metric("skipped_steps", self.scaler.skipped_steps)
            live.log_metric("loss_scale", self.scaler.current_scale())
        live.log_metric("tokens_per_sec", round(self.tokens_per_step / seconds, 1))
        live.log_metric("tokens_seen", step * self.tokens_per_step)

    def _report_plan(self, live, step: int, start: int, end: int) -> None:
        """Print and log the session plan (stages/lib/training/session_plan.py) from the steps timed so far."""
        plan = plan_session(step, start, end, self.plan.total_steps, self.timer.step_times, time.monotonic(),
                            self.timer.deadline, self.timer.reserve(), *self.stored)
        lines = plan_lines(plan)
        metrics = plan_metrics(plan)
        if self.memory_plan is not None:  # the plan checked against what the first steps took
            measured, what = memory.measured_peak(self.device)
            lines.append(memory.measured_line(self.memory_plan, measured, what))
            metrics.update({"memory/peak_gib": round(measured / memory.GIB, 3),
                            "memory/plan_gib": round(self.memory_plan.peak / memory.GIB, 3)})
        for line in lines:
            self.progress.event(line)
        for name, value in metrics.items():
            live.log_metric(name, value)

    def _evaluate(self, live, step: int) -> int:
        if not self.val:
            return step
        began = time.monotonic()
        self.model.eval()
        total = torch.zeros((), device=self.device)
        # Every process scores the same batches: FSDP needs all of them in each forward, and they are few.
        with torch.no_grad(), self.precision.autocast():
            for batch in self.val:
                batch = batch.to(self.device)
                total += self.parallel.forward(*batch.arguments()).float()
        self.model.train()
        live.step = step
        loss = (total / max(1, counted_tokens(self.val))).item()
        live.log_metric("val/loss", loss)
        for name, value in self._preference_metrics().items():
            live.log_metric(f"val/{name}", value)
        live.make_summary()
        self.progress.event(f"step {step}: val/loss {loss:.4f}")
        self.timer.measured["eval"] = time.monotonic() - began
        return step

    def _save(self, step: int, live) -> int:
        began = time.monotonic()
        live.make_summary()  # metrics.json up to this step, for the logs' snapshot
        state = {"step": step, "total_steps": self.plan.total_steps, "tokens_seen": step * self.tokens_per_step,
                 "data_cursor": self.batches.cursor(step).as_dict(), "fingerprint": self.plan.fingerprint,
                 "fingerprint_values": self.plan.values, "world_size": self.world.size,
                 "batch_params": self.decision.asked_batch, "run": self.plan.run, "schedule": self.plan.schedule,
                 "pre_decay": step == self.schedule.pre_decay_step}
        self.last_saved = store.save(Path(self.train.checkpoint_dir), self.recovery_dir, self.trainee, state)
        self.last_state = state
        seconds = time.monotonic() - began
        kept = " (kept: a longer budget continues from here)" if state["pre_decay"] else ""
        self.progress.event(f"step {step}: saved {Path(self.train.checkpoint_dir) / store.folder_name(step)} "
                            f"in {seconds:.1f} s{kept}")
        self.timer.measured["save"] = seconds
        self.timer.measured["export"] = export_seconds(seconds, *self.stored)
        return step
