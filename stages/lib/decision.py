"""What a training session will do, decided once before it starts: pure functions, no I/O.

A run is defined by its fingerprint: the sha256 of the settings that define it (model, tokenizer and training data,
seq_len, global batch, optimiser and schedule settings, seed, budget; a LoRA's rank, alpha, dropout and targets).
From params.yaml, the token files' meta, the tokenizer and the checkpoints found, `decide` makes one immutable
Decision: the run's plan, the checkpoint to resume (or none, and why), the grad_accum for this number of processes,
and the messages to print. Rank 0 makes it, every process receives the same Decision (as JSON), and the session runs
it without deciding anything again.

Resume (`train.resume`): `auto` resumes a matching checkpoint and otherwise starts a new run, naming the settings
that changed; `require` fails instead; `never` always starts a new run. Settings that only shape a session can
change between sessions: steps_today, minutes_today, save_every, eval_every, eval_batches, compile, device,
precision, activation_checkpointing, export, checkpoint_dir and out_dir; so can batch_size and grad_accum as long as their
product (the global batch) stays the same. Resuming on another number of processes with the same batch settings keeps the run's global batch
by changing grad_accum for the session (or says which batch_size and grad_accum would).
"""

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from stages.lib.checkpoint import Checkpoint
from stages.lib.checkpoint_store import Found
from stages.lib.errors import UserError
from stages.lib.params import TrainParams
from stages.lib.schedule import total_steps


@dataclass(frozen=True)
class RunPlan:
    """What defines the run, and how long it is."""

    values: dict  # the fingerprinted settings
    fingerprint: str
    total_steps: int


@dataclass(frozen=True)
class Decision:
    """Everything a session needs to know before its first step; the same on every process."""

    plan: RunPlan
    vocab_size: int
    special_ids: dict
    world_size: int
    grad_accum: int  # this session's, which keeps the run's global batch on `world_size` processes
    # The batch settings as params.yaml gives them, before any change for another number of processes: recorded in
    # the checkpoint, they tell the next session whether only the number of processes changed.
    asked_batch: dict
    resume: Checkpoint | None
    from_recovery: bool = False  # the checkpoint to resume is the recovery copy, newer than DVC's
    messages: tuple = ()

    @property
    def start_step(self) -> int:
        """The step this session starts from."""
        return self.resume.step if self.resume else 0

    def session_params(self, train: TrainParams) -> TrainParams:
        """train with this session's grad_accum."""
        return replace(train, grad_accum=self.grad_accum)

    def as_json(self) -> dict:
        """JSON-ready form, to send to the other processes."""
        value = asdict(self)
        value["resume"] = {"path": str(self.resume.path), "state": self.resume.state} if self.resume else None
        return value

    @classmethod
    def from_json(cls, value: dict) -> "Decision":
        """Inverse of as_json."""
        resume = value["resume"]
        return cls(**{**value, "plan": RunPlan(**value["plan"]), "messages": tuple(value["messages"]),
                      "resume": Checkpoint(Path(resume["path"]), resume["state"]) if resume else None})


@dataclass(frozen=True)
class Inputs:
    """What the decision is made from, besides params.yaml: read by rank 0 before deciding."""

    meta: dict  # the token files' meta.json
    windows_per_epoch: int
    vocab_size: int  # the model's: the tokenizer's length or the token files' vocabulary, whichever is larger
    special_ids: dict
    base_model: str | None  # the content hash of train.init_from's model (None: a new model from train.model)
    found: Found  # the checkpoints in the checkpoint folder and the recovery copy, and what DVC recorded
    checkpoint_dir: Path
    logs_exist: bool  # whether earlier sessions left metric logs


def decide(train: TrainParams, inputs: Inputs, world_size: int) -> Decision:
    """The session's Decision (see the module docstring); a UserError when train.resume forbids what it finds."""
    asked = {"batch_size": train.batch_size, "grad_accum": train.grad_accum}
    messages = []
    plan = run_plan(train, inputs, world_size)
    grad_accum = train.grad_accum
    if train.resume != "never":
        grad_accum, note = grad_accum_for_world(train, plan, inputs.found.checkpoints, world_size)
        if grad_accum != train.grad_accum:
            messages.append(note)
            plan = run_plan(replace(train, grad_accum=grad_accum), inputs, world_size)
    resume, why = choose_checkpoint(train, plan, inputs)
    messages += why
    from_recovery = resume is not None and resume.path.parent != Path(inputs.checkpoint_dir)
    return Decision(plan, inputs.vocab_size, inputs.special_ids, world_size, grad_accum, asked, resume,
                    from_recovery, tuple(messages))


def run_plan(train: TrainParams, inputs: Inputs, world_size: int) -> RunPlan:
    """The run's fingerprint and length."""
    values = fingerprint_values(train, inputs.meta, world_size, inputs.base_model)
    fingerprint = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    total = total_steps(train.total_step_budget, train.epochs, inputs.windows_per_epoch, values["global_batch"])
    return RunPlan(values, fingerprint, total)


def fingerprint_values(train: TrainParams, meta: dict, world_size: int, base_model: str | None) -> dict:
    """The settings that define a run: a checkpoint resumes only when all of them are unchanged.

    A pretrained model (train.init_from) counts by the content of its config and weight files, not by its path;
    a LoRA by its settings (a full fine-tune has none, so its fingerprint is what it was before LoRA existed).
    """
    values = {f"model.{k}": v for k, v in asdict(train.model).items()} if not train.init_from else {}
    if train.init_from:
        values["base_model_sha256"] = base_model
    if train.lora.r:
        values.update({f"lora.{k}": v for k, v in asdict(train.lora).items()})
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


# Fingerprinted values whose raw change (two hashes) says little: what a person should read instead.
CHANGE_NAMES = {"base_model_sha256": "the base model in train.init_from (its config or weight files)",
                "tokenizer_fingerprint": "the tokenizer (data/tokenizer/tokenizer.json)",
                "train_data_sha256": "the training tokens (data/tokens/train.bin)",
                "train_mask_sha256": "which training tokens count in the loss (tokenize.train_on_prompt?)"}


def changed_settings(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every fingerprinted setting that differs (hashes named by what they stand for)."""
    return [f"{CHANGE_NAMES[key]} changed" if key in CHANGE_NAMES and key in old and key in new
            else f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def grad_accum_for_world(train: TrainParams, plan: RunPlan, found: list[Checkpoint],
                         world_size: int) -> tuple[int, str]:
    """train.grad_accum, or the one that keeps the run's global batch when its checkpoint was trained with the same
    batch settings on another number of processes; with a note saying what it changed."""
    for candidate in found:
        state, old = candidate.state, candidate.state["fingerprint_values"]
        if state["fingerprint"] == plan.fingerprint:
            return train.grad_accum, ""
        only_batch_differs = {k for k in set(old) | set(plan.values) if old.get(k) != plan.values.get(k)} == {
            "global_batch"}
        same_settings = (state["batch_params"] == {"batch_size": train.batch_size, "grad_accum": train.grad_accum}
                         if "batch_params" in state else state.get("world_size", 1) != world_size)
        if only_batch_differs and same_settings:
            grad_accum = fit_global_batch(old["global_batch"], train.batch_size, world_size)
            return grad_accum, (f"the checkpoint at step {candidate.step} was trained on "
                                f"{state.get('world_size', 1)} process(es) with a global batch of "
                                f"{old['global_batch']}; to keep it on {world_size}, this session uses "
                                f"train.grad_accum = {grad_accum} instead of {train.grad_accum}")
    return train.grad_accum, ""


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


def choose_checkpoint(train: TrainParams, plan: RunPlan, inputs: Inputs) -> tuple[Checkpoint | None, list[str]]:
    """Apply `train.resume` to the checkpoints found: the one to resume (None: a new run) and what to say."""
    checkpoint_dir, found = Path(inputs.checkpoint_dir), inputs.found.checkpoints
    if train.resume == "never":
        return None, ["train.resume = never: starting a new run"]
    ours = [c for c in found if c.state["fingerprint"] == plan.fingerprint]
    if ours:
        return _newest_or_restored(ours, checkpoint_dir, inputs.found)
    if found:
        changes = "; ".join(changed_settings(found[0].state["fingerprint_values"], plan.values))
        why = f"the checkpoint in {found[0].path} (step {found[0].step}) belongs to a different run; changed: {changes}"
        if train.resume == "require":
            raise UserError(f"train.resume = require, but {why}. Put those settings back to resume it, or set "
                            "train.resume: auto to start a new run")
        return None, [f"starting a new run: {why}"]
    if inputs.logs_exist:
        hint = (f"{train.out_dir}/live holds logs of earlier sessions but {checkpoint_dir} holds no checkpoint: did "
                "you forget `dvc pull`?")
        if train.resume == "require":
            raise UserError(f"train.resume = require: {hint} (or set train.resume: auto to start over)")
        return None, [f"warning: {hint} Starting a new run."]
    if train.resume == "require":
        raise UserError(f"train.resume = require, but {checkpoint_dir} holds no checkpoint; run a first session "
                        "with train.resume: auto")
    return None, []


def _newest_or_restored(ours: list[Checkpoint], checkpoint_dir: Path, found: Found) -> tuple[Checkpoint, list[str]]:
    """This run's checkpoint to resume: the newest, unless it is a recovery copy that DVC recorded while the
    checkpoint folder holds an older one, which was then restored on purpose (see stages/lib/checkpoint_store.py)."""
    newest = ours[0]
    in_place = next((c for c in ours if c.path.parent == checkpoint_dir), None)
    if newest is in_place:
        return newest, [f"resuming from step {newest.step}: {newest.path}"]
    if in_place is None:
        return newest, [f"resuming from step {newest.step}: {newest.path} (the recovery copy; {checkpoint_dir} "
                        "holds none of this run)"]
    if found.recorded_by_dvc(newest):
        return in_place, [f"resuming from step {in_place.step}: {in_place.path}, restored on purpose: the newer "
                          f"step {newest.step} in {newest.path.parent} ended a session that DVC recorded, so the "
                          f"older one in {checkpoint_dir} was checked out deliberately"]
    return newest, [f"resuming from step {newest.step}: {newest.path} (the recovery copy, newer than the step "
                    f"{in_place.step} that DVC restored into {checkpoint_dir}: its session never ended normally "
                    "under DVC, so DVC never recorded it). To go back to the older step on purpose, delete "
                    f"{newest.path.parent}/ first"]
