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
Rolling back on purpose to an older checkpoint restored by DVC: delete `.checkpoint-recovery/` first, otherwise the
newer recovery copy wins (see stages/checkpoint.py).
"""

import contextlib
import hashlib
import json
import math
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from stages import checkpoint as ckpt
from stages.batches import TokenWindows, TrainBatches, counted_tokens, validation_batches
from stages.errors import UserError, run_stage
from stages.live_logs import has_logs, open_live, restore_logs, snapshot_logs
from stages.model import export_model, make_loss_fn, new_model, pretrained_model, set_special_ids
from stages.params import TOKENIZER_DIR, TOKENS_DIR, TrainParams, load_params
from stages.schedule import lr_at, session_end, time_for_another_step, total_steps
from stages.token_files import open_split, read_meta

MODELS_DIR = Path("models")
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


@dataclass
class SessionResult:
    """How a session went: the steps it covered and why it stopped."""

    start_step: int
    end_step: int
    stopped_by: str = "budget"  # budget | steps_today | time | signal | nothing-to-do
    exit_code: int = 0
    first_step_at: float | None = None  # time.monotonic() when the first step ended (startup benchmarks)


def main() -> None:
    """Run one training session with the settings in params.yaml."""
    params = load_params()
    result = run_session(params.train, trust_remote_code=params.tokenizer.trust_remote_code)
    if result.exit_code:
        sys.exit(result.exit_code)


def run_session(train: TrainParams, tokens_dir: Path = TOKENS_DIR, tokenizer_dir: Path = TOKENIZER_DIR,
                models_dir: Path = MODELS_DIR, recovery_dir: Path = ckpt.RECOVERY_DIR,
                trust_remote_code: bool = False) -> SessionResult:
    """One session: resume or start, train within today's limits, save, log and export."""
    started = time.monotonic()
    meta = read_meta(tokens_dir)
    train_windows = _windows(tokens_dir, "train", train.seq_len, required=True)
    val_windows = _windows(tokens_dir, "val", train.seq_len, required=False) if "val" in meta["splits"] else None
    plan = plan_run(train, meta, train_windows.count, tokenizer_dir, trust_remote_code)
    live_dir = Path(train.out_dir) / "live"
    checkpoint = choose_checkpoint(train, plan, recovery_dir, live_dir)
    start = checkpoint.step if checkpoint else 0
    export_dir = Path(models_dir) / train.model_name
    if start >= plan.total_steps:
        return _budget_spent(train, plan, checkpoint, tokenizer_dir, export_dir)
    end = session_end(start, plan.total_steps, train.steps_today)

    _seed_everything(train.seed)
    device = pick_device(train.device)
    model = build_model(train, plan).to(device)
    optimizer = make_optimizer(model, train)
    if checkpoint is not None:
        ckpt.load_checkpoint(checkpoint, model, optimizer, device)
    session = Session(train, plan, model, optimizer, device, TrainBatches(
        train_windows, train.seed, train.batch_size, train.grad_accum), val_windows, started, recovery_dir)
    print(f"run of {plan.total_steps} steps ({plan.fingerprint}): this session trains steps {start} -> {end} on "
          f"{device} ({session.precision}), {sum(p.numel() for p in model.parameters()):,} parameters")
    result = session.run(start, end, live_dir)
    if result.stopped_by in ("budget", "steps_today", "time") and result.end_step > start:
        export_model(model, tokenizer_dir, export_dir)
        print(f"exported the model at step {result.end_step} to {export_dir}/")
    return result


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
             trust_remote_code: bool = False) -> RunPlan:
    """The run's fingerprint and length, from the settings, the tokenizer and the token files."""
    tokenizer = _load_tokenizer(tokenizer_dir, trust_remote_code)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    values = fingerprint_values(train, meta)
    fingerprint = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    total = total_steps(train.total_step_budget, train.epochs, windows_per_epoch, train.batch_size * train.grad_accum)
    return RunPlan(values, fingerprint, total, max(len(tokenizer), meta["vocab_size"]), special)


def _load_tokenizer(tokenizer_dir: Path, trust_remote_code: bool):
    if not Path(tokenizer_dir).is_dir():
        raise UserError(f"{tokenizer_dir} not found: run the tokenizer stage first (dvc repro tokenizer)")
    return AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)


def fingerprint_values(train: TrainParams, meta: dict) -> dict:
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
        "seq_len": train.seq_len, "global_batch": train.batch_size * train.grad_accum,
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


def pick_device(wanted: str) -> torch.device:
    """The device to train on: `auto` takes a GPU when there is one."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device = cuda, but torch sees no CUDA GPU; set train.device: auto or cpu")
    return torch.device("cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu")


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
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps; a second signal acts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal = signum
        signal.signal(signum, self._previous[signum])
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint and stopping",
              file=sys.stderr, flush=True)


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
    """The training loop of one session, with its logging, evaluation and checkpoints."""

    def __init__(self, train: TrainParams, plan: RunPlan, model, optimizer, device: torch.device,
                 batches: TrainBatches, val_windows: TokenWindows | None, started: float, recovery_dir: Path):
        self.train, self.plan, self.model, self.optimizer, self.device = train, plan, model, optimizer, device
        self.batches, self.recovery_dir = batches, recovery_dir
        self.precision = pick_precision(train.precision, device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.loss_fn = make_loss_fn(model, compile=train.compile)
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
        if not self.timer.allows_step():
            print(f"train.minutes_today = {self.train.minutes_today} leaves no time for a step and a save: "
                  "nothing trained")
            result.stopped_by = "time"
            return result
        live = open_live(live_dir, start if start > 0 else None)
        saved = evaluated = start
        step = start
        with StopRequest() as stop, tqdm(total=end - start, desc=f"steps {start}->{end}", unit="step",
                                         dynamic_ncols=True) as bar:
            while step < end:
                if stop.signal is not None or not self.timer.allows_step():
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
        if stop.signal is not None:
            result.stopped_by, result.exit_code = "signal", 128 + stop.signal
        elif step < end:
            result.stopped_by = "time"
            print(f"stopping at step {step}: train.minutes_today = {self.train.minutes_today} is nearly used up")
        if step > start and result.stopped_by != "signal" and evaluated != step:
            self._evaluate(live, step)
        live.make_summary()
        if step > start and saved != step:
            self._save(step, live)
        return result

    def step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step (all its micro-batches); returns the loss, gradient norm and seconds taken."""
        began = time.perf_counter()
        batches = self.batches.step_batches(step)
        counted = max(1, counted_tokens(batches))  # the loss is a mean over the step's counted tokens
        total = torch.zeros((), device=self.device)
        for inputs, labels in batches:
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with self.autocast():
                loss_sum = self.loss_fn(inputs, labels)
            (loss_sum / counted).backward()
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
        loss, grad_norm = (total / counted).item(), grad_norm.item()
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
        with torch.no_grad(), self.autocast():
            for inputs, labels in self.val:
                total += self.loss_fn(inputs.to(self.device), labels.to(self.device)).float()
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
                 "fingerprint_values": self.plan.values}
        ckpt.save_checkpoint(Path(self.train.checkpoint_dir), self.recovery_dir, self.model, self.optimizer, state)
        snapshot_logs(Path(self.train.out_dir) / "live", self.recovery_dir / LOGS_SNAPSHOT)
        seconds = time.monotonic() - began
        self.timer.measured["save"] = seconds
        self.timer.measured["export"] = seconds  # an export writes about what a checkpoint's weights take
        return step


if __name__ == "__main__":
    run_stage(main)
