"""The training loop of one session: steps, validation, checkpoints, logs, and when to stop.

The session runs a Decision (stages/lib/decision.py) and decides nothing itself: it trains from the decision's step
until `train.steps_today` / `train.minutes_today` / the budget says stop, or a signal does (stages/lib/stop.py),
evaluating every `eval_every` and saving every `save_every` steps and at the end.

In a multi-process run every process runs it in step: each trains on its slice of the data, all of them evaluate
(the same batches) and take part in saving; rank 0 alone logs and writes. The loss is a mean over the counted tokens
of all processes, so the gradient is the one a single process would compute for the same global batch.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from stages.lib import checkpoint as ckpt
from stages.lib.batches import Samples, TrainBatches, counted_tokens, validation_batches
from stages.lib.decision import Decision
from stages.lib.live_logs import open_live
from stages.lib.parallel import full_value
from stages.lib.params import TrainParams
from stages.lib.precision import Precision
from stages.lib.schedule import lr_at, time_for_another_step
from stages.lib.stop import StopRequest

SAVE_BYTES_PER_SECOND = 100e6  # a cautious disk speed, to reserve time for a save before one has been timed


@dataclass
class SessionResult:
    """How a session went: the steps it covered and why it stopped."""

    start_step: int
    end_step: int
    stopped_by: str = "budget"  # budget | steps_today | time | signal | nothing-to-do
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
    reserve_guess: float
    step_times: list = field(default_factory=list)
    measured: dict = field(default_factory=dict)  # eval / save / export seconds, once timed

    def allows_step(self) -> bool:
        """Whether one more step still leaves time for the closing eval, save and export."""
        if math.isinf(self.deadline):
            return True
        step = max(self.step_times[-5:], default=0.0)
        reserve = sum(self.measured.values()) * 1.2 if len(self.measured) == 3 else self.reserve_guess
        return time_for_another_step(time.monotonic(), self.deadline, step, reserve)


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
        self.model, self.optimizer, self.device = trainee.parallel.model, trainee.optimizer, trainee.world.device
        self.batches, self.recovery_dir = batches, recovery_dir
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.val = validation_batches(val_samples, train.batch_size, train.eval_batches) if val_samples else []
        self.tokens_per_step = batches.samples_per_step * train.seq_len
        self.timer = SessionTimer(started + train.minutes_today * 60 if train.minutes_today else math.inf,
                                  self._reserve_guess())
        self.last_saved: dict | None = None  # rank 0's parts as captured by the latest save

    def _reserve_guess(self) -> float:
        # Before a save has been timed: weights + two Adam moments written twice (checkpoint, export), plus margin.
        size = 4 * sum(p.numel() for p in self.model.parameters()) * 4
        return size / SAVE_BYTES_PER_SECOND + 2.0

    def run(self, start: int, end: int) -> SessionResult:
        """Train steps start -> end (or until stopped), saving and logging on the way."""
        result = SessionResult(start, start, stopped_by="steps_today" if end < self.plan.total_steps else "budget")
        main = self.world.is_main
        if self._should_stop(None, check_time=True)[1]:
            if main:
                print(f"train.minutes_today = {self.train.minutes_today} leaves no time for a step and a save: "
                      "nothing trained")
            result.stopped_by = "time"
            return result
        live = open_live(self.trainee.live_dir, start if start > 0 else None) if main else _NoLogs()
        facts = self.batches.samples.facts()  # the same all run: in metrics.json, not plotted per step
        live.summary["data"] = {"padding_share": round(facts["padding_share"], 4),
                                "documents_split": facts["documents_split"]}
        saved = evaluated = step = start
        stop = StopRequest(repeat_window=1.0 if self.world.size > 1 else 0.0, launcher_pid=self.world.launcher_pid)
        with stop, tqdm(total=end - start, desc=f"steps {start}->{end}", unit="step", dynamic_ncols=True,
                        disable=not main) as bar:
            while True:
                signum, out_of_time = self._should_stop(stop, check_time=step < end)
                if signum or out_of_time or step >= end:
                    break
                loss, grad_norm, seconds = self.step(step)
                step += 1
                result.first_step_at = result.first_step_at or time.monotonic()
                self.timer.step_times.append(seconds)
                self._log_step(live, step, loss, grad_norm, seconds)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self.tokens_per_step / seconds:,.0f}", refresh=False)
                bar.update()
                if step % self.train.eval_every == 0:
                    evaluated = self._evaluate(live, step)
                if step % self.train.save_every == 0:
                    saved = self._save(step, live)
        result.end_step = step
        if signum:
            result.stopped_by, result.exit_code = "signal", 128 + signum
        elif out_of_time:
            result.stopped_by = "time"
            if main:
                print(f"stopping at step {step}: train.minutes_today = {self.train.minutes_today} is nearly used up")
        if step > start and result.stopped_by != "signal" and evaluated != step:
            self._evaluate(live, step)
        live.make_summary()
        if step > start and saved != step:
            self._save(step, live)
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
        # DDP and FSDP average the gradients over the processes: scaling by their number makes that a sum, so the
        # gradient is the one one process would get for the whole global batch.
        scale = self.world.size
        on_device = [batch.to(self.device) for batch in batches]  # copies queued up front
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(on_device):
            with self.parallel.gradient_sync(last_micro_step=i == len(on_device) - 1):
                with self.precision.autocast():
                    loss_sum = self.parallel.forward(batch.inputs, batch.labels, batch.positions)
                ((loss_sum * scale if scale > 1 else loss_sum) / counted).backward()
            total += loss_sum.detach()
        params = self.model.parameters()
        if self.train.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        lr = lr_at(step, self.plan.total_steps, self.train.lr, self.train.min_lr, self.train.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss, grad_norm = (self.world.sum_tensor(total) / counted).item(), full_value(grad_norm).item()
        return loss, grad_norm, time.perf_counter() - began

    def _log_step(self, live, step: int, loss: float, grad_norm: float, seconds: float) -> None:
        live.step = step
        live.log_metric("train/loss", loss)
        live.log_metric("lr", self.optimizer.param_groups[0]["lr"])
        live.log_metric("grad_norm", grad_norm)
        live.log_metric("tokens_per_sec", round(self.tokens_per_step / seconds, 1))
        live.log_metric("tokens_seen", step * self.tokens_per_step)

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
                total += self.parallel.forward(batch.inputs, batch.labels, batch.positions).float()
        self.model.train()
        live.step = step
        live.log_metric("val/loss", (total / max(1, counted_tokens(self.val))).item())
        live.make_summary()
        self.timer.measured["eval"] = time.monotonic() - began
        return step

    def _save(self, step: int, live) -> int:
        began = time.monotonic()
        live.make_summary()  # metrics.json up to this step, for the logs' snapshot
        state = {"step": step, "total_steps": self.plan.total_steps, "tokens_seen": step * self.tokens_per_step,
                 "data_cursor": self.batches.cursor(step).as_dict(), "fingerprint": self.plan.fingerprint,
                 "fingerprint_values": self.plan.values, "world_size": self.world.size,
                 "batch_params": self.decision.asked_batch}
        self.last_saved = ckpt.save(Path(self.train.checkpoint_dir), self.recovery_dir, self.trainee, state)
        seconds = time.monotonic() - began
        self.timer.measured["save"] = seconds
        self.timer.measured["export"] = seconds  # an export writes about what a checkpoint's weights take
        return step
