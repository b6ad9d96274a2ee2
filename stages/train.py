"""Train stage: one training session that continues the run exactly where the last one stopped.

    python -m stages.train      (dvc repro train / dvc exp run)

A run is defined by its fingerprint (model, tokenizer and training data, seq_len, global batch, optimiser and
schedule settings, seed, budget). Each session resumes from the newest checkpoint with the same fingerprint,
trains until `train.steps_today` / `train.minutes_today` / the whole budget says stop, saves a checkpoint, logs to
DVCLive and exports the model to `models/<model_name>/`. Once the budget is spent a session changes nothing.

Budget: `total_step_budget` optimizer steps over all sessions, or, when it is 0, `epochs` passes over the training
windows rounded up to whole steps. The learning-rate schedule (linear warmup, cosine to min_lr) spans the whole
budget, so splitting a run into sessions changes nothing: on CPU the weights come out bitwise identical.

Resume (`train.resume`): `auto` resumes a matching checkpoint and otherwise starts a new run, naming the settings
that changed; `require` fails instead; `never` always starts a new run. Settings that only shape a session can
change between sessions: steps_today, minutes_today, save_every, eval_every, eval_batches, compile, device,
precision, checkpoint_dir and out_dir; so can batch_size and grad_accum as long as their product (the global batch)
stays the same. Weight decay applies to matrices, embeddings included, not to norms or biases.

Stopping early: SIGTERM or Ctrl-C finishes the current step, saves a checkpoint and exits with 128 + the signal
number; a second Ctrl-C stops at once (checkpoints are written atomically, so the previous one stays usable).

Several processes (`train.devices`, `train.strategy`; see stages/distributed.py): each reads its own slice of every
global batch, which is batch_size x grad_accum x processes samples and belongs to the fingerprint. Resuming on another
number of processes with the same batch settings keeps the run's global batch by changing grad_accum for the session
(or says which batch_size and grad_accum would). The loss is a mean over the counted tokens of all processes, so the
gradient is the one a single process would compute for the same global batch.
Rolling back on purpose to an older checkpoint restored by DVC: delete `.checkpoint-recovery/` first, otherwise the
newer recovery copy wins (see stages/checkpoint.py).
"""

import contextlib
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from stages import checkpoint as ckpt
from stages.batches import TokenWindows, TrainBatches, counted_tokens, validation_batches
from stages.distributed import (ParallelModel, World, exit_code_to_report, full_value, gather_full_state, joined_world,
                                launch, launcher_gone, parallel_model, pick_device, processes_to_start,
                                spread_full_state, under_torchrun)
from stages.errors import UserError, run_stage
from stages.live_logs import has_logs, open_live, restore_logs, snapshot_logs
from stages.model import export_model, new_model, pretrained_model, set_special_ids
from stages.params import MODELS_DIR, TOKENIZER_DIR, TOKENS_DIR, TrainParams, load_params
from stages.schedule import lr_at, session_end, time_for_another_step, total_steps
from stages.token_files import open_split, read_meta

LOGS_SNAPSHOT = "live"  # the DVCLive logs as of the recovery checkpoint, inside the recovery folder
SAVE_BYTES_PER_SECOND = 100e6  # a cautious disk speed, to reserve time for a save before one has been timed


@dataclass
class RunPlan:
    """What defines the run, and how long it is."""

    values: dict  # the fingerprinted settings
    fingerprint: str
    total_steps: int
    vocab_size: int
    special_ids: dict
    world_size: int = 1


@dataclass
class SessionResult:
    """How a session went: the steps it covered and why it stopped."""

    start_step: int
    end_step: int
    stopped_by: str = "budget"  # budget | steps_today | time | signal | nothing-to-do
    exit_code: int = 0
    first_step_at: float | None = None  # time.monotonic() when the first step ended (startup benchmarks)


def main() -> None:
    """Run one training session with the settings in params.yaml, in several processes when train.devices asks."""
    params = load_params()
    processes = processes_to_start(params.train.devices, params.train.device)
    if processes > 1 and not under_torchrun():
        sys.exit(launch(processes))
    sys.exit(exit_code_to_report(_session_in_this_process(params)))


def _session_in_this_process(params) -> int:
    """One process's part of the session; its exit code (1 for a UserError, whose message rank 0 prints)."""
    world = None
    try:
        with joined_world(params.train.device) as world:
            if world.is_main and world.size > 1 and params.train.devices not in ("auto", world.size):
                print(f"torchrun started {world.size} processes: train.devices = {params.train.devices} is not used")
            return run_session(params.train, trust_remote_code=params.tokenizer.trust_remote_code,
                               world=world).exit_code
    except UserError as err:
        if world is None or world.size == 1 or world.is_main or not world.launched_here:
            print(f"error: {err}", file=sys.stderr)
        return 1


def run_session(train: TrainParams, tokens_dir: Path = TOKENS_DIR, tokenizer_dir: Path = TOKENIZER_DIR,
                models_dir: Path = MODELS_DIR, recovery_dir: Path = ckpt.RECOVERY_DIR,
                trust_remote_code: bool = False, world: World | None = None) -> SessionResult:
    """One session: resume or start, train within today's limits, save, log and export.

    `world`: this process's place in a multi-process session (default: one process on `train.device`).
    """
    started = time.monotonic()
    world = world or World(device=pick_device(train.device))
    meta = read_meta(tokens_dir)
    train_windows = _windows(tokens_dir, "train", train.seq_len, required=True)
    val_windows = _windows(tokens_dir, "val", train.seq_len, required=False) if "val" in meta["splits"] else None
    plan = plan_run(train, meta, train_windows.count, tokenizer_dir, trust_remote_code, world.size)
    live_dir = Path(train.out_dir) / "live"
    # The batch settings as params.yaml gives them, before any change for another number of processes: recorded in
    # the checkpoint, they tell the next session whether only the number of processes changed.
    asked = {"batch_size": train.batch_size, "grad_accum": train.grad_accum}
    decision = world.decide_on_main(lambda: _resume_decision(train, plan, meta, train_windows.count, recovery_dir,
                                                             live_dir))
    if decision["grad_accum"] != train.grad_accum:
        train = replace(train, grad_accum=decision["grad_accum"])
        plan = replan(plan, train, meta, train_windows.count)
    checkpoint = ckpt.Checkpoint(Path(decision["path"]), decision["state"]) if decision["path"] else None
    start = checkpoint.step if checkpoint else 0
    export_dir = Path(models_dir) / train.model_name
    if start >= plan.total_steps:
        if world.is_main:
            return _budget_spent(train, plan, checkpoint, tokenizer_dir, export_dir)
        return SessionResult(start, start, stopped_by="nothing-to-do")
    end = session_end(start, plan.total_steps, train.steps_today)

    _seed_everything(train.seed)
    parallel = parallel_model(build_model(train, plan), world, train.strategy, train.compile)
    optimizer = make_optimizer(parallel.model, train)
    if checkpoint is not None:
        _load_checkpoint(checkpoint, parallel, optimizer, world)
    batches = TrainBatches(train_windows, train.seed, train.batch_size, train.grad_accum, world.size, world.rank)
    session = Session(train, plan, parallel.model, optimizer, world.device, batches, val_windows, started,
                      recovery_dir, world=world, parallel=parallel, asked_batch=asked)
    if world.is_main:
        print(f"run of {plan.total_steps} steps ({plan.fingerprint}): this session trains steps {start} -> {end} on "
              f"{world.describe(train.strategy)} ({session.precision}), "
              f"{sum(p.numel() for p in parallel.model.parameters()):,} parameters")
    result = session.run(start, end, live_dir)
    if result.stopped_by in ("budget", "steps_today", "time") and result.end_step > start and world.is_main:
        export_model(_model_to_export(parallel, train, plan), tokenizer_dir, export_dir)
        print(f"exported the model at step {result.end_step} to {export_dir}/")
    return result


def _resume_decision(train: TrainParams, plan: RunPlan, meta: dict, windows_per_epoch: int, recovery_dir: Path,
                     live_dir: Path) -> dict:
    """Rank 0's choice of checkpoint and grad_accum, as JSON for the other processes."""
    found = ckpt.find_checkpoints([Path(train.checkpoint_dir), recovery_dir])
    grad_accum = grad_accum_for_world(train, plan, found)
    if grad_accum != train.grad_accum:
        train = replace(train, grad_accum=grad_accum)
        plan = replan(plan, train, meta, windows_per_epoch)
    checkpoint = choose_checkpoint(train, plan, recovery_dir, live_dir)
    return {"grad_accum": grad_accum, "path": str(checkpoint.path) if checkpoint else None,
            "state": checkpoint.state if checkpoint else None}


def _load_checkpoint(checkpoint: ckpt.Checkpoint, parallel: ParallelModel, optimizer, world: World) -> None:
    if world.size == 1:
        ckpt.load_checkpoint(checkpoint, parallel.model, optimizer, world.device)
        return
    weights, optimizer_state, rng = ckpt.read_checkpoint(checkpoint) if world.is_main else (None, None, None)
    spread_full_state(parallel, optimizer, world, weights, optimizer_state)
    ckpt.set_rng_state(world.share(rng))


def _model_to_export(parallel: ParallelModel, train: TrainParams, plan: RunPlan):
    if parallel.strategy != "fsdp":
        return parallel.model
    # The shards are spread over the processes: rebuild the whole model from the checkpoint just saved.
    model = build_model(train, plan)
    ckpt.load_weights(ckpt.find_checkpoints([Path(train.checkpoint_dir)])[0], model)
    return model


def _windows(tokens_dir: Path, split: str, seq_len: int, required: bool) -> TokenWindows | None:
    ids, mask = open_split(tokens_dir, split)
    windows = TokenWindows(ids, mask, seq_len)
    if windows.count == 0:
        if required:
            raise UserError(f"{tokens_dir}/{split}: {len(ids)} tokens are too few for one window of train.seq_len "
                            f"+ 1 = {seq_len + 1} tokens; lower train.seq_len or add training data")
        return None
    return windows


def plan_run(train: TrainParams, meta: dict, windows_per_epoch: int, tokenizer_dir: Path,
             trust_remote_code: bool = False, world_size: int = 1) -> RunPlan:
    """The run's fingerprint and length, from the settings, the tokenizer, the token files and the process count."""
    tokenizer = _load_tokenizer(tokenizer_dir, trust_remote_code)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    empty = RunPlan({}, "", 0, max(len(tokenizer), meta["vocab_size"]), special, world_size)
    return replan(empty, train, meta, windows_per_epoch)


def replan(plan: RunPlan, train: TrainParams, meta: dict, windows_per_epoch: int) -> RunPlan:
    """`plan` (same tokenizer, same processes) for changed settings."""
    values = fingerprint_values(train, meta, plan.world_size)
    fingerprint = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    total = total_steps(train.total_step_budget, train.epochs, windows_per_epoch, values["global_batch"])
    return replace(plan, values=values, fingerprint=fingerprint, total_steps=total)


def _load_tokenizer(tokenizer_dir: Path, trust_remote_code: bool):
    if not Path(tokenizer_dir).is_dir():
        raise UserError(f"{tokenizer_dir} not found: run the tokenizer stage first (dvc repro tokenizer)")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)


def fingerprint_values(train: TrainParams, meta: dict, world_size: int = 1) -> dict:
    """The settings that define a run: a checkpoint resumes only when all of them are unchanged."""
    values = {f"model.{k}": v for k, v in asdict(train.model).items()} if not train.init_from else {}
    if train.init_from:
        config = Path(train.init_from) / "config.json"
        values["init_from"] = train.init_from
        values["init_from_config_sha256"] = hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None
    values.update({
        "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
        "train_data_sha256": meta["splits"]["train"]["sha256"],
        "train_mask_sha256": meta["splits"]["train"].get("mask_sha256"),  # train_on_prompt changes only the mask
        "seq_len": train.seq_len, "global_batch": train.batch_size * train.grad_accum * world_size,
        "lr": train.lr, "min_lr": train.min_lr, "warmup_steps": train.warmup_steps,
        "weight_decay": train.weight_decay, "beta1": train.beta1, "beta2": train.beta2, "grad_clip": train.grad_clip,
        "seed": train.seed, "total_step_budget": train.total_step_budget,
        "epochs": train.epochs if train.total_step_budget == 0 else None,  # epochs only count without a budget
    })
    return values


def changed_settings(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every fingerprinted setting that differs."""
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def grad_accum_for_world(train: TrainParams, plan: RunPlan, found: list[ckpt.Checkpoint]) -> int:
    """train.grad_accum, or the one that keeps the run's global batch when its checkpoint was trained with the same
    batch settings on another number of processes (saying what it changed)."""
    if train.resume == "never":
        return train.grad_accum
    for candidate in found:
        state, old = candidate.state, candidate.state["fingerprint_values"]
        if state["fingerprint"] == plan.fingerprint:
            return train.grad_accum
        only_batch_differs = {k for k in set(old) | set(plan.values) if old.get(k) != plan.values.get(k)} == {
            "global_batch"}
        same_settings = (state["batch_params"] == {"batch_size": train.batch_size, "grad_accum": train.grad_accum}
                         if "batch_params" in state else state.get("world_size", 1) != plan.world_size)
        if only_batch_differs and same_settings:
            grad_accum = fit_global_batch(old["global_batch"], train.batch_size, plan.world_size)
            print(f"the checkpoint at step {candidate.step} was trained on {state.get('world_size', 1)} process(es) "
                  f"with a global batch of {old['global_batch']}; to keep it on {plan.world_size}, this session uses "
                  f"train.grad_accum = {grad_accum} instead of {train.grad_accum}")
            return grad_accum
    return train.grad_accum


def fit_global_batch(global_batch: int, batch_size: int, world_size: int) -> int:
    """The grad_accum giving `global_batch` samples per step with `batch_size` on `world_size` processes; a
    UserError naming settings that would work when there is none."""
    per_process, uneven = divmod(global_batch, world_size)
    if uneven:
        raise UserError(f"the run's global batch is {global_batch} samples (train.batch_size x grad_accum x "
                        f"processes), which {world_size} processes cannot share evenly; train on a number of "
                        f"processes that divides {global_batch} (train.devices), or set train.resume: never to "
                        "start a new run")
    if per_process % batch_size == 0:
        return per_process // batch_size
    sizes = [b for b in range(per_process, 0, -1) if per_process % b == 0][:4]
    options = ", ".join(f"batch_size {b} with grad_accum {per_process // b}" for b in sizes)
    raise UserError(f"the run's global batch is {global_batch} samples, {per_process} per process on {world_size} "
                    f"processes, which train.batch_size = {batch_size} does not divide. Set train.batch_size and "
                    f"train.grad_accum to multiply to {per_process}: {options} (or set train.resume: never to start "
                    "a new run)")


def choose_checkpoint(train: TrainParams, plan: RunPlan, recovery_dir: Path, live_dir: Path) -> ckpt.Checkpoint | None:
    """Apply `train.resume` to the checkpoints found; None means start a new run."""
    checkpoint_dir = Path(train.checkpoint_dir)
    if train.resume == "never":
        print("train.resume = never: starting a new run")
        return None
    found = ckpt.find_checkpoints([checkpoint_dir, recovery_dir])
    for candidate in found:
        if candidate.state["fingerprint"] == plan.fingerprint:
            where = "" if candidate.path.parent == checkpoint_dir else " (recovery copy, newer than DVC's)"
            print(f"resuming from step {candidate.step}: {candidate.path}{where}")
            if candidate.path.parent != checkpoint_dir:  # put it back where DVC will record it
                candidate = ckpt.Checkpoint(ckpt.mirror(candidate.path, checkpoint_dir), candidate.state)
                ckpt.prune(checkpoint_dir, keep=candidate.path.name)
                if restore_logs(recovery_dir / LOGS_SNAPSHOT, live_dir):
                    print(f"restored the logs of the recovered steps into {live_dir}")
            return candidate
    if found:
        changes = "; ".join(changed_settings(found[0].state["fingerprint_values"], plan.values))
        why = f"the checkpoint in {found[0].path} (step {found[0].step}) belongs to a different run; changed: {changes}"
        if train.resume == "require":
            raise UserError(f"train.resume = require, but {why}. Put those settings back to resume it, or set "
                            "train.resume: auto to start a new run")
        print(f"starting a new run: {why}")
    elif has_logs(live_dir):
        hint = (f"{live_dir} holds logs of earlier sessions but {checkpoint_dir} holds no checkpoint: did you forget "
                "`dvc pull`?")
        if train.resume == "require":
            raise UserError(f"train.resume = require: {hint} (or set train.resume: auto to start over)")
        print(f"warning: {hint} Starting a new run.")
    elif train.resume == "require":
        raise UserError(f"train.resume = require, but {checkpoint_dir} holds no checkpoint; run a first session "
                        "with train.resume: auto")
    return None


def _budget_spent(train: TrainParams, plan: RunPlan, checkpoint: ckpt.Checkpoint, tokenizer_dir: Path,
                  export_dir: Path) -> SessionResult:
    print(f"the run's budget of {plan.total_steps} steps is spent (checkpoint at step {checkpoint.step}): nothing "
          "to train. To train further, raise train.total_step_budget (or epochs), which starts a new run.")
    if not (export_dir / "config.json").exists():
        # DVC deletes a non-persistent output before running the stage: rebuild it, same bytes as before.
        model = build_model(train, plan)
        ckpt.load_weights(checkpoint, model)
        export_model(model, tokenizer_dir, export_dir)
        print(f"re-exported the model at step {checkpoint.step} to {export_dir}/")
    return SessionResult(checkpoint.step, checkpoint.step, stopped_by="nothing-to-do")


def pick_precision(wanted: str, device: torch.device) -> str:
    """fp32 or bf16 (autocast); `auto` is bf16 on GPUs that support it, fp32 elsewhere."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if wanted == "bf16" and not bf16_ok:
        raise UserError(f"train.precision = bf16 is not supported on {device} (on CPUs bf16 matmuls are far slower "
                        "than fp32); set train.precision: auto or fp32")
    return "bf16" if wanted == "bf16" or (wanted == "auto" and bf16_ok) else "fp32"


def build_model(train: TrainParams, plan: RunPlan):
    """The run's model as it is before any training (same seed, same weights)."""
    if train.init_from:
        model = pretrained_model(train.init_from, plan.vocab_size, train.seq_len, train.seed)
    else:
        model = new_model(train.model, plan.vocab_size, plan.special_ids, train.seed)
    set_special_ids(model, plan.special_ids)
    return model


def make_optimizer(model, train: TrainParams) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings included) and none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=True)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


class _NoLogs:
    """Stands in for DVCLive on the processes other than rank 0, which log nothing."""

    step = 0

    def log_metric(self, *args, **kwargs) -> None:
        """Nothing: rank 0 logs."""

    def make_summary(self) -> None:
        """Nothing: rank 0 logs."""


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


class Session:
    """The training loop of one session, with its logging, evaluation and checkpoints.

    In a multi-process run every process runs it in step: each trains on its slice of the data, all of them
    evaluate (the same batches) and take part in saving; rank 0 alone logs and writes.
    """

    def __init__(self, train: TrainParams, plan: RunPlan, model, optimizer, device: torch.device,
                 batches: TrainBatches, val_windows: TokenWindows | None, started: float, recovery_dir: Path,
                 world: World | None = None, parallel: ParallelModel | None = None, asked_batch: dict | None = None):
        self.train, self.plan, self.model, self.optimizer, self.device = train, plan, model, optimizer, device
        self.batches, self.recovery_dir = batches, recovery_dir
        self.world = world or World(device=device)
        self.parallel = parallel or parallel_model(model, self.world, train.strategy, train.compile)
        self.asked_batch = asked_batch or {"batch_size": train.batch_size, "grad_accum": train.grad_accum}
        self.precision = pick_precision(train.precision, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.val = validation_batches(val_windows, train.batch_size, train.eval_batches) if val_windows else []
        self.tokens_per_step = batches.samples_per_step * train.seq_len
        self.started = started
        self.timer = SessionTimer(started + train.minutes_today * 60 if train.minutes_today else math.inf,
                                  self._reserve_guess())

    def _reserve_guess(self) -> float:
        # Before a save has been timed: weights + two Adam moments written twice (checkpoint, export), plus margin.
        size = 4 * sum(p.numel() for p in self.model.parameters()) * 4
        return size / SAVE_BYTES_PER_SECOND + 2.0

    def autocast(self):
        """The precision context for forward passes."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, start: int, end: int, live_dir: Path) -> SessionResult:
        """Train steps start -> end (or until stopped), saving and logging on the way."""
        result = SessionResult(start, start, stopped_by="steps_today" if end < self.plan.total_steps else "budget")
        main = self.world.is_main
        if self._should_stop(None, check_time=True)[1]:
            if main:
                print(f"train.minutes_today = {self.train.minutes_today} leaves no time for a step and a save: "
                      "nothing trained")
            result.stopped_by = "time"
            return result
        live = open_live(live_dir, start if start > 0 else None) if main else _NoLogs()
        saved = evaluated = start
        step = start
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
        on_device = [self._to_device(inputs, labels) for inputs, labels in batches]  # copies queued up front
        total = torch.zeros((), device=self.device)
        for i, (inputs, labels) in enumerate(on_device):
            with self.parallel.gradient_sync(last_micro_step=i == len(on_device) - 1):
                with self.autocast():
                    loss_sum = self.parallel.forward(inputs, labels)
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

    def _to_device(self, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.device.type == "cuda":  # from pinned host memory the copy runs while the GPU computes
            inputs, labels = inputs.pin_memory(), labels.pin_memory()
        return inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

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
        with torch.no_grad(), self.autocast():
            for inputs, labels in self.val:
                total += self.parallel.forward(inputs.to(self.device), labels.to(self.device)).float()
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
                 "batch_params": self.asked_batch}
        checkpoint_dir = Path(self.train.checkpoint_dir)
        if self.world.size == 1:
            ckpt.save_checkpoint(checkpoint_dir, self.recovery_dir, self.model, self.optimizer, state)
        else:
            gathered = gather_full_state(self.parallel, self.optimizer, self.world)  # every process takes part
            if self.world.is_main:
                weights, optimizer_state = gathered
                ckpt.save_gathered_checkpoint(checkpoint_dir, self.recovery_dir, weights, self.parallel.tied,
                                              optimizer_state, state)
        if self.world.is_main:
            snapshot_logs(Path(self.train.out_dir) / "live", self.recovery_dir / LOGS_SNAPSHOT)
        self.world.barrier()  # the checkpoint is whole before any process goes on, or leaves
        seconds = time.monotonic() - began
        self.timer.measured["save"] = seconds
        self.timer.measured["export"] = seconds  # an export writes about what a checkpoint's weights take
        return step


if __name__ == "__main__":
    run_stage(main)
