"""What a training session will do, decided once before it starts: pure functions, no I/O.

A run is defined by the settings behind its `run` fingerprint (model, tokenizer and training data, seq_len, packing,
global batch, optimiser settings, peak and final learning rate, warmup, seed; a LoRA's rank, alpha, dropout,
targets, whether its base is held in 4 bits and whether it trains the embeddings; the optimizer). Its plan, how long
it is and the shape of its learning rate (total_step_budget or epochs, train.schedule, decay_steps /
decay_fraction), is not part of it: a checkpoint of the same run with another plan is the same run,
extended (or shortened). The checkpoint's `fingerprint` covers both (the run and its schedule), so two checkpoints of
the same step and fingerprint hold the same state. From params.yaml, the token files' meta, the tokenizer and the
checkpoints found, `decide` makes one immutable Decision: the run's plan, the checkpoint to resume (or none, and why),
the grad_accum for this number of processes, and the messages to print. Rank 0 makes it, every process receives the same
Decision (as JSON), and the session runs it without deciding anything again.

Resume (`train.resume`): `auto` resumes the newest checkpoint of the same run and otherwise starts a new run, naming the
settings that changed; `require` fails instead; `never` always starts a new run. Settings that only shape a session can
change between sessions: steps_today, minutes_today, save_every, eval_every, eval_batches, log_every, compile, device,
precision, activation_checkpointing, export, checkpoint_dir and out_dir; so can batch_size and grad_accum as long as
their product (the global batch) stays the same. Resuming on another number of processes with the same batch settings
keeps the run's global batch by changing grad_accum for the session (or says which batch_size and grad_accum would).

Another plan (stages/lib/training/schedule.py): the newest checkpoint whose updates so far got the learning rates the
new plan gives them continues exactly, as if the new plan had been set from the start: with wsd any checkpoint up to the
start of the decay, which is why the one saved there is kept. Otherwise the newest checkpoint continues with the
schedule re-planned over the remaining steps, from the learning rate it had reached; the re-planned schedule is recorded
in every later checkpoint, so the sessions after it follow the same curve.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from stages.lib.base.errors import UserError
from stages.lib.base.params import TrainParams
from stages.lib.checkpointing.parts import Checkpoint
from stages.lib.checkpointing.store import Found
from stages.lib.tokenizing.token_files import packing_for
from stages.lib.training.schedule import Schedule, agrees_until, total_steps

# The settings that plan the run's length and learning-rate shape: changing them extends (or shortens) the run.
PLAN_KEYS = ("total_step_budget", "epochs", "schedule", "decay_steps", "decay_fraction")


@dataclass(frozen=True)
class RunPlan:
    """What defines the run, and its plan: how long it is and its learning rate at every step."""

    values: dict  # the settings behind the fingerprints: the run's own and its plan's (PLAN_KEYS)
    fingerprint: str  # of the run and its schedule: one step of one fingerprint is one state
    total_steps: int
    run: str  # of the run alone (PLAN_KEYS left out): the same for every plan of the run
    schedule: dict  # the Schedule (stages/lib/training/schedule.py) as JSON, re-planned when the plan changed mid-run


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
    samples_per_epoch: int  # training samples (stream windows or packed samples) in one pass over the data
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
    resume, plan, why = choose_checkpoint(train, plan, inputs)
    messages += why
    from_recovery = resume is not None and resume.path.parent != Path(inputs.checkpoint_dir)
    return Decision(plan, inputs.vocab_size, inputs.special_ids, world_size, grad_accum, asked, resume,
                    from_recovery, tuple(messages))


def run_plan(train: TrainParams, inputs: Inputs, world_size: int) -> RunPlan:
    """The run's fingerprints and the plan params.yaml asks for."""
    values = fingerprint_values(train, inputs.meta, world_size, inputs.base_model)
    total = total_steps(train.total_step_budget, train.epochs, inputs.samples_per_epoch, values["global_batch"])
    schedule = Schedule.planned(train.schedule, total, train.lr, train.min_lr, train.warmup_steps,
                                train.decay_steps, train.decay_fraction)
    return with_schedule(RunPlan(values, "", total, _digest(run_values(values)), {}), schedule)


def with_schedule(plan: RunPlan, schedule: Schedule) -> RunPlan:
    """The plan following `schedule`, its fingerprint to match."""
    record = schedule.as_json()
    return replace(plan, schedule=record, total_steps=schedule.total_steps,
                   fingerprint=_digest({"settings": plan.values, "schedule": record}))


def _digest(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def run_values(values: dict) -> dict:
    """The settings that define the run itself: its fingerprinted values without the plan's."""
    return {k: v for k, v in values.items() if k not in PLAN_KEYS}


def run_of(checkpoint: Checkpoint) -> str:
    """A checkpoint's run fingerprint (computed for checkpoints of versions that did not record it)."""
    return checkpoint.state.get("run") or _digest(run_values(checkpoint.state["fingerprint_values"]))


def schedule_of(checkpoint: Checkpoint) -> Schedule:
    """The schedule a checkpoint was trained with (older versions: cosine over its total_steps)."""
    if "schedule" in checkpoint.state:
        return Schedule.from_json(checkpoint.state["schedule"])
    values = checkpoint.state["fingerprint_values"]
    return Schedule("cosine", checkpoint.state["total_steps"], values["lr"], values["min_lr"],
                    values["warmup_steps"])


def fingerprint_values(train: TrainParams, meta: dict, world_size: int, base_model: str | None) -> dict:
    """The settings that define a run (a checkpoint resumes only when they are unchanged) and those that plan it
    (PLAN_KEYS: they may change, the run is then extended or shortened). A pretrained model (train.init_from)
    counts by the content of its config and weight files, not by its path; a LoRA by its settings (a full
    fine-tune has none, so its fingerprint is what it was before LoRA existed)."""
    wsd = train.schedule == "wsd"
    values = {f"model.{k}": v for k, v in asdict(train.model).items()} if not train.init_from else {}
    if train.init_from:
        values["base_model_sha256"] = base_model
    if train.lora.r:
        values.update({f"lora.{k}": v for k, v in asdict(train.lora).items()
                       if v != ABSENT_MEANS.get(f"lora.{k}", ...)})
        if train.lora.train_embeddings:
            values["embedding_lr"] = train.embedding_lr
    if train.optimizer != ABSENT_MEANS["optimizer"]:
        values["optimizer"] = train.optimizer
    values.update({
        "tokenizer_fingerprint": meta["tokenizer_fingerprint"],
        "train_data_sha256": meta["splits"]["train"]["sha256"],
        "train_mask_sha256": meta["splits"]["train"].get("mask_sha256"),  # train_on_prompt changes only the mask
        "seq_len": train.seq_len, "packing": packing_for(meta, train.packing),
        "global_batch": train.batch_size * train.grad_accum * world_size,
        "lr": train.lr, "min_lr": train.min_lr, "warmup_steps": train.warmup_steps,
        "weight_decay": train.weight_decay, "beta1": train.beta1, "beta2": train.beta2, "grad_clip": train.grad_clip,
        "seed": train.seed, "total_step_budget": train.total_step_budget,
        "epochs": train.epochs if train.total_step_budget == 0 else None,  # epochs only count without a budget
        "schedule": train.schedule,
        "decay_steps": train.decay_steps if wsd else None,
        "decay_fraction": train.decay_fraction if wsd and not train.decay_steps else None,
    })
    if train.objective != "sft":  # an SFT run's fingerprint stays what it was before preference tuning existed
        values.update(preference_values(train, meta))
    return values


# Settings added after runs were fingerprinted without them: they count only when they differ from what was done
# before they existed, so the runs made before keep their fingerprint (and resume); absent means this value.
ABSENT_MEANS = {"lora.quantize": "none", "lora.train_embeddings": False, "optimizer": "adamw"}

# Fingerprinted values whose raw change (two hashes) says little: what a person should read instead.
CHANGE_NAMES = {"base_model_sha256": "the base model in train.init_from (its config or weight files)",
                "tokenizer_fingerprint": "the tokenizer (data/tokenizer/tokenizer.json)",
                "train_data_sha256": "the training tokens (data/tokens/train.bin)",
                "train_mask_sha256": "which training tokens count in the loss (tokenize.train_on_prompt?)"}


def changed_settings(old: dict, new: dict) -> list[str]:
    """`key: old -> new` for every fingerprinted setting that differs (hashes named by what they stand for)."""
    return [f"{CHANGE_NAMES[key]} changed" if key in CHANGE_NAMES and key in old and key in new
            else f"{key}: {old.get(key, ABSENT_MEANS.get(key))!r} -> {new.get(key, ABSENT_MEANS.get(key))!r}"
            for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)]


def grad_accum_for_world(train: TrainParams, plan: RunPlan, found: list[Checkpoint],
                         world_size: int) -> tuple[int, str]:
    """train.grad_accum, or the one that keeps the run's global batch when its checkpoint was trained with the same
    batch settings on another number of processes; with a note saying what it changed."""
    for candidate in found:
        state, old = candidate.state, run_values(candidate.state["fingerprint_values"])
        if run_of(candidate) == plan.run:
            return train.grad_accum, ""
        new = run_values(plan.values)
        only_batch_differs = {k for k in set(old) | set(new) if old.get(k) != new.get(k)} == {"global_batch"}
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


def choose_checkpoint(train: TrainParams, plan: RunPlan,
                      inputs: Inputs) -> tuple[Checkpoint | None, RunPlan, list[str]]:
    """Apply `train.resume` to the checkpoints found: the one to resume (None: a new run), the plan the session
    follows, and what to say."""
    checkpoint_dir, found = Path(inputs.checkpoint_dir), inputs.found.checkpoints
    if train.resume == "never":
        return None, plan, ["train.resume = never: starting a new run"]
    same_run = [c for c in found if run_of(c) == plan.run]
    if same_run:
        candidates, notes = _restored_on_purpose(same_run, checkpoint_dir, inputs.found)
        checkpoint, plan, messages = continue_run(plan, candidates, checkpoint_dir)
        return checkpoint, plan, notes + messages
    if found:
        changes = "; ".join(changed_settings(run_values(found[0].state["fingerprint_values"]),
                                             run_values(plan.values)))
        why = f"the checkpoint in {found[0].path} (step {found[0].step}) belongs to a different run; changed: {changes}"
        if train.resume == "require":
            raise UserError(f"train.resume = require, but {why}. Put those settings back to resume it, or set "
                            "train.resume: auto to start a new run")
        return None, plan, [f"starting a new run: {why}"]
    if inputs.logs_exist:
        hint = (f"{train.out_dir}/live holds logs of earlier sessions but {checkpoint_dir} holds no checkpoint: did "
                "you forget `dvc pull`?")
        if train.resume == "require":
            raise UserError(f"train.resume = require: {hint} (or set train.resume: auto to start over)")
        return None, plan, [f"warning: {hint} Starting a new run."]
    if train.resume == "require":
        raise UserError(f"train.resume = require, but {checkpoint_dir} holds no checkpoint; run a first session "
                        "with train.resume: auto")
    return None, plan, []


def _restored_on_purpose(same_run: list[Checkpoint], checkpoint_dir: Path,
                         found: Found) -> tuple[list[Checkpoint], list[str]]:
    """The run's checkpoints a session may continue from (newest first), and a note when the newest is a recovery
    copy: it counts unless DVC recorded it while the checkpoint folder holds an older one, which was then restored
    on purpose (see stages/lib/checkpointing/store.py)."""
    newest = same_run[0]
    in_place = next((c for c in same_run if c.path.parent == checkpoint_dir), None)
    if newest is in_place:
        return same_run, []
    if in_place is None:
        return same_run, [f"{checkpoint_dir} holds no checkpoint of this run: taking the recovery copy {newest.path}"]
    if found.recorded_by_dvc(newest):
        return [c for c in same_run if c.step <= in_place.step], [
            f"{in_place.path} was restored on purpose: the newer step {newest.step} in {newest.path.parent} ended a "
            f"session that DVC recorded, so the older one in {checkpoint_dir} was checked out deliberately"]
    return same_run, [f"the recovery copy {newest.path} is newer than the step {in_place.step} that DVC restored into "
                      f"{checkpoint_dir}: its session never ended normally under DVC, so DVC never recorded it. To go "
                      f"back to the older step on purpose, delete {newest.path.parent}/ first"]


def continue_run(plan: RunPlan, same_run: list[Checkpoint],
                 checkpoint_dir: Path) -> tuple[Checkpoint, RunPlan, list[str]]:
    """Which of the run's checkpoints (newest first) the session continues from, and under which schedule: the
    newest one's when the plan is unchanged; otherwise see the module docstring."""
    latest, wanted = same_run[0], Schedule.from_json(plan.schedule)
    current = schedule_of(latest)
    resuming = [f"resuming from step {latest.step}: {_where(latest, checkpoint_dir)}"]
    if current.without_restart() == wanted:  # the same plan: the checkpoint's schedule, re-planned or not
        return latest, with_schedule(plan, current), resuming
    if latest.step >= wanted.total_steps:  # a budget the run has already trained past: nothing left to do
        return latest, with_schedule(plan, wanted), resuming
    change = (f"the run's plan changed ({'; '.join(changed_settings(latest.state['fingerprint_values'], plan.values))}"
              f"): now {wanted.total_steps} steps, {wanted.describe()}")
    choices = [wanted] + ([replace(wanted, restart=current.restart)] if current.restart else [])
    for checkpoint in same_run:
        for schedule in choices:
            if checkpoint.step <= agrees_until(schedule_of(checkpoint), schedule):
                return checkpoint, with_schedule(plan, schedule), [_exact_note(change, checkpoint, latest,
                                                                               checkpoint_dir)]
    replanned = wanted.replanned(latest.step, current.lr_at(latest.step), current.stable_steps)
    return latest, with_schedule(plan, replanned), [
        f"{change}. Continuing from step {latest.step} with the learning rate re-planned over the remaining steps: "
        f"{replanned.describe()} ({_where(latest, checkpoint_dir)})"]


def _exact_note(change: str, checkpoint: Checkpoint, latest: Checkpoint, checkpoint_dir: Path) -> str:
    if checkpoint is latest:
        return (f"{change}. The learning rates so far are the same under it: continuing exactly from step "
                f"{checkpoint.step} ({_where(checkpoint, checkpoint_dir)})")
    return (f"{change}. The decay had begun after step {checkpoint.step}: continuing exactly from the checkpoint "
            f"kept there, so steps {checkpoint.step}..{latest.step} are trained again under the new plan "
            f"({_where(checkpoint, checkpoint_dir)})")


def _where(checkpoint: Checkpoint, checkpoint_dir: Path) -> str:
    return f"{checkpoint.path}{'' if checkpoint.path.parent == checkpoint_dir else ' (the recovery copy)'}"


def preference_values(train: TrainParams, meta: dict) -> dict:
    """The fingerprinted settings of a preference run: its objective, beta and reference, and the pairs it trains on
    (its samples are pairs, whatever train.packing says)."""
    return {"objective": train.objective, "beta": train.beta,
            "reference": train.reference if train.objective == "dpo" else None,
            "train_pairs_sha256": meta["pairs"]["train"]["sha256"] if meta.get("pairs") else None,
            "packing": "pairs"}
