"""One training session put together: the processes, the decision, the model, the loop, the export, the summary.

The train stage's command (stages/train.py) hands over to `train_in_processes` once it knows there is work to do.
The story of a session, and where each part lives:
1. start one process per device when `train.devices` asks for several (stages/lib/distributed/launcher.py, world.py);
2. decide, once, on rank 0: the run's fingerprint and plan, the checkpoint to resume and this session's grad_accum
   (stages/lib/training/decision.py, from the inputs read by stages/lib/training/preflight.py; the checkpoint format is
   stages/lib/checkpointing/parts.py);
3. build the model (stages/lib/modeling/families.py; with train.lora, adapters on the frozen base: lora.py), wrap it for
   the processes (parallel.py), restore the checkpoint;
4. find today's time limit when `train.minutes_today` is auto (stages/lib/training/deadline.py);
5. run the loop (stages/lib/training/loop.py), then export (stages/lib/modeling/export.py), draw the loss curves
   (stages/lib/training/loss_plot.py) and print the summary (stages/lib/training/summary.py).
"""

import contextlib
import os
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stages.lib.base.devices import pick_device
from stages.lib.base.errors import UserError
from stages.lib.base.files import folder_size
from stages.lib.base.params import MODELS_DIR, TOKENIZER_DIR, TOKENS_DIR, Params, TrainParams
from stages.lib.checkpointing import parts as ckpt
from stages.lib.checkpointing import store
from stages.lib.distributed.launcher import exit_code_to_report, launch, processes_to_start, under_torchrun
from stages.lib.distributed.parallel import parallel_model
from stages.lib.distributed.world import World, joined_world
from stages.lib.modeling import lora, memory
from stages.lib.modeling.export import export_model
from stages.lib.modeling.families import (
    build_model,
    checkpoint_activations,
    flash_attention_for_documents,
    keeps_documents_apart,
    model_config,
    pick_document_attention,
    tied_names,
)
from stages.lib.modeling.model_folders import holds
from stages.lib.modeling.precision import LossScaler, Precision, pick_precision
from stages.lib.tokenizing.batches import TrainBatches, describe_samples, split_samples
from stages.lib.tokenizing.loading import tokenizer_facts
from stages.lib.tokenizing.pairs import describe_pairs
from stages.lib.tokenizing.token_files import dominant_documents, packing_for, read_meta
from stages.lib.training.deadline import session_minutes
from stages.lib.training.decision import Decision, decide
from stages.lib.training.loop import Session, SessionResult
from stages.lib.training.loss_plot import write_loss_plot
from stages.lib.training.optimizers import make_optimizer
from stages.lib.training.preference_runs import preference_samples
from stages.lib.training.preflight import budget_spent_message, read_inputs
from stages.lib.training.schedule import session_end
from stages.lib.training.summary import SessionNumbers, read_losses, summary_lines


def train_in_processes(params: Params) -> int:
    """Run one training session with these settings, in several processes when train.devices asks; its exit code."""
    processes = processes_to_start(params.train.devices, params.train.device)
    if processes > 1 and not under_torchrun():
        return launch(processes)
    return exit_code_to_report(_session_in_this_process(params))


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
        # Every process stops with it, and rank 0 shows it (stages/lib/distributed/failures.py).
        shown_by_rank_0 = world is not None and world.failures is not None and world.failures.report(str(err))
        if world is None or world.is_main or not shown_by_rank_0:
            print(f"error: {err}", file=sys.stderr)
        return 1


def run_session(train: TrainParams, tokens_dir: Path = TOKENS_DIR, tokenizer_dir: Path = TOKENIZER_DIR,
                models_dir: Path = MODELS_DIR, recovery_dir: Path | None = None,
                trust_remote_code: bool = False, world: World | None = None) -> SessionResult:
    """One session: resume or start, train within today's limits, save, log and export.

    `world`: this process's place in a multi-process session (default: one process on `train.device`). Rank 0
    holds the workspace's checkpoint lock for the whole session: one writer at a time.
    """
    started = time.monotonic()
    recovery_dir = store.default_recovery_dir() if recovery_dir is None else recovery_dir
    world = world or World(device=pick_device(train.device))
    with store.session_lock(recovery_dir) if world.is_main else contextlib.nullcontext():
        return _locked_session(train, tokens_dir, tokenizer_dir, models_dir, recovery_dir, trust_remote_code, world,
                               started)


def _locked_session(train: TrainParams, tokens_dir: Path, tokenizer_dir: Path, models_dir: Path, recovery_dir: Path,
                    trust_remote_code: bool, world: World, started: float) -> SessionResult:
    live_dir = Path(train.out_dir) / "live"
    meta = read_meta(tokens_dir)
    packing = packing_for(meta, train.packing)
    if train.objective != "sft":  # whole preference pairs (stages/lib/training/preference_runs.py)
        train_samples, val_samples = preference_samples(train, tokens_dir)
    else:
        train_samples = split_samples(tokens_dir, "train", train.seq_len, packing, train.seed, required=True,
                                      meta=meta)
        val_samples = (split_samples(tokens_dir, "val", train.seq_len, packing, None, required=False, meta=meta)
                       if "val" in meta["splits"] else None)
    decision = Decision.from_json(world.decide_on_main(lambda: decide_on_main(
        train, meta, train_samples.count, tokenizer_dir, recovery_dir, trust_remote_code, world.size).as_json()))
    train = decision.session_params(train)
    start, total = decision.start_step, decision.plan.total_steps
    export_dir = Path(models_dir) / train.model_name
    if start >= total:
        if world.is_main:
            return _budget_spent(train, decision, tokenizer_dir, export_dir, trust_remote_code)
        return SessionResult(start, start, stopped_by="nothing-to-do")

    precision = pick_precision(train.precision, world.device, warn=world.is_main)
    memory_plan = check_memory(train, decision, world, precision)
    with out_of_memory_as_advice(memory_plan, Path(train.checkpoint_dir), recovery_dir):
        trainee = build_trainee(train, decision, world, live_dir, precision)
        parameters = sum(p.numel() for p in trainee.parallel.model.parameters())
        train = _with_time_limit(train, decision, export_dir, parameters, started, world.is_main)
        batches = TrainBatches(train_samples, train.seed, train.batch_size, train.grad_accum, world.size, world.rank)
        session = Session(train, decision, trainee, precision, batches, val_samples, started, recovery_dir)
        session.memory_plan = memory_plan
        end = session_end(start, total, train.steps_today)
        if world.is_main:
            print(f"run of {total} steps ({decision.plan.fingerprint}): this session trains steps {start} -> {end} "
                  f"on {world.describe(train.strategy)} ({precision.describe()}), {parameters:,} parameters"
                  + (f", {_adapter_parameters(trainee):,} of them in the LoRA adapters that train" if train.lora.r
                     else ""), flush=True)
            described = (describe_pairs if train.objective != "sft" else describe_samples)(train_samples.facts(),
                                                                                          train.seq_len)
            for line in [described, *dominant_documents(meta)]:
                print(line, flush=True)
        result = session.run(start, end)
    if result.trained and world.is_main:
        _export(_model_to_export(session, train, decision), train, tokenizer_dir, export_dir, trust_remote_code)
        print(f"exported the model at step {result.end_step} to {export_dir}/ ({folder_size(export_dir) / 1e6:,.1f} MB"
              + (", the adapter" if train.export == "adapter" else "") + ")")
        store.note_recorded(recovery_dir, session.last_state)
        write_loss_plot(live_dir)
        print("\n".join(summary_lines(_numbers(session, result, live_dir))), flush=True)
    return result


def _with_time_limit(train: TrainParams, decision: Decision, export_dir: Path, parameters: int, started: float,
                     say: bool) -> TrainParams:
    """train with minutes_today as a number: the machine's limit for `auto`, less the time a push will take."""
    # What a push sends: the checkpoint and the export, as big as the last ones, or about 16 bytes per parameter
    # (fp32 weights and two Adam moments in the checkpoint, fp32 weights in the export) before there are any.
    pushed = folder_size(decision.resume.path) + folder_size(export_dir) if decision.resume else 16 * parameters
    minutes, note = session_minutes(train.minutes_today, pushed, elapsed=time.monotonic() - started)
    if say and note:
        print(note, flush=True)
    return replace(train, minutes_today=minutes)


def _numbers(session: Session, result: SessionResult, live_dir: Path) -> SessionNumbers:
    saved = Path(session.train.checkpoint_dir) / store.folder_name(result.end_step)
    return SessionNumbers(result.start_step, result.end_step, session.plan.total_steps, session.tokens_per_step,
                          tuple(session.timer.step_times), result.stopped_by, saved if saved.is_dir() else None,
                          folder_size(saved), read_losses(live_dir, result.start_step), live_dir)


def decide_on_main(train: TrainParams, meta: dict, samples_per_epoch: int, tokenizer_dir: Path, recovery_dir: Path,
                   trust_remote_code: bool, world_size: int) -> Decision:
    """Rank 0's decision: read what it is made from, decide, say it, and bring a recovery copy back into place."""
    vocab_size, special_ids = tokenizer_facts(tokenizer_dir, trust_remote_code, meta)
    decision = decide(train, read_inputs(train, meta, samples_per_epoch, vocab_size, special_ids, recovery_dir),
                      world_size)
    for message in decision.messages:
        print(message)
    if decision.from_recovery:  # put it back where DVC will record it
        return replace(decision, resume=store.bring_back(decision.resume, Path(train.checkpoint_dir)))
    return decision


def check_memory(train: TrainParams, decision: Decision, world: World,
                 precision: Precision) -> memory.MemoryPlan:
    """The session's memory plan from the model's config, printed before anything is loaded; a UserError naming
    settings that would fit when it does not fit the device's free memory."""
    shape = memory.model_shape(model_config(train, decision.vocab_size, decision.special_ids))
    setup = memory.Setup(train.batch_size, train.seq_len, train.grad_accum, precision.name,
                         train.activation_checkpointing, shards=world.size if train.strategy == "fsdp" else 1,
                         sequences=2 if train.objective != "sft" else 1,
                         **lora.checked_plan_settings(train, decision.vocab_size, shape),
                         **memory.plan_settings(train, decision.plan.values["packing"] == "documents" and not
                                                flash_attention_for_documents(world.device, precision.autocast_dtype)))
    free = memory.available_memory(world.device)
    if world.device.type == "cpu":  # the processes of this machine share its memory
        free //= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    plan = memory.plan_memory(shape, setup, free, _device_name(world.device))
    if world.is_main:
        print("\n".join(plan.lines()))
    ram = memory.gather_short_message(shape, setup, memory.available_memory(torch.device("cpu"))) if (
        world.is_main and setup.shards > 1) else None
    if world.max([float(not plan.fits()), float(ram is not None)]) != [0.0, 0.0]:  # any process short stops all
        raise UserError(memory.does_not_fit_message(plan) if not plan.fits() else ram or "rank 0's host RAM is "
                        "short of what a save gathers (see its message)")
    return plan


@contextlib.contextmanager
def out_of_memory_as_advice(plan: memory.MemoryPlan, checkpoint_dir: Path, recovery_dir: Path):
    """A CUDA out-of-memory error in the block becomes a UserError: what was saved, and settings that need less."""
    try:
        yield
    except torch.OutOfMemoryError:
        found = store.find(checkpoint_dir, recovery_dir).checkpoints
        saved = (f"the checkpoint at step {found[0].step} in {found[0].path.parent} is untouched and the next "
                 "session resumes from it" if found else "no checkpoint was written")
        raise UserError(memory.out_of_memory_message(plan, saved)) from None


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def build_trainee(train: TrainParams, decision: Decision, world: World, live_dir: Path,
                  precision: Precision) -> ckpt.Trainee:
    """The run's model, optimizer and loss scaler on this process, wrapped for the processes, with the checkpoint
    restored."""
    _seed_everything(train.seed)
    model = build_model(train, decision.vocab_size, decision.special_ids,
                        dtype=lora.base_dtype(train, precision.autocast_dtype),
                        **lora.base_load_options(train.lora, precision.autocast_dtype, world.device))
    if train.lora.r:
        lora.add_adapters(model, train.lora)
    model.train()  # from_pretrained hands models over in eval mode: dropout must be on from the first step
    if decision.plan.values["packing"] == "documents":
        if not keeps_documents_apart(model):
            raise UserError(f"train.packing = documents, but this {type(model).__name__} ignores the position ids "
                            "that keep packed documents apart, so they would attend to each other; set "
                            "train.packing: stream")
        pick_document_attention(model, world.device, precision.autocast_dtype)
    if train.activation_checkpointing:
        checkpoint_activations(model)
    preference = (train.objective, train.beta) if train.objective != "sft" else None
    parallel = parallel_model(model, world, train.strategy, train.compile, preference)
    scaler = LossScaler(precision.scales_loss, world.device.type, sharded=parallel.strategy == "fsdp")
    trainee = ckpt.Trainee(parallel, make_optimizer(parallel.model, train), world, live_dir, scaler,
                           adapters=bool(train.lora.r))
    if world.rank:  # every process draws its own dropout masks, as one process does for each micro-batch
        _seed_everything(train.seed + world.rank)
    if decision.resume is not None:
        ckpt.restore(decision.resume, trainee)
    return trainee


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _adapter_parameters(trainee: ckpt.Trainee) -> int:
    return sum(p.numel() for p in trainee.parallel.model.parameters() if p.requires_grad)


def _export(model, train: TrainParams, tokenizer_dir: Path, export_dir: Path, trust_remote_code: bool) -> None:
    export_model(model, tokenizer_dir, export_dir, trust_remote_code, train.export, train.init_from)


def _model_to_export(session: Session, train: TrainParams, decision: Decision):
    if train.lora.r:  # the base as its files hold it (not as trained in 16 bits), with the adapters last saved
        return lora.trained_model(train, decision.vocab_size, decision.special_ids, session.last_saved["adapters"])
    if session.parallel.strategy != "fsdp":
        return session.parallel.model
    # The shards are spread over the processes: a whole model from the weights the last save gathered.
    return _model_with_weights(train, decision, session.last_saved["weights"][0])


def _model_with_weights(train: TrainParams, decision: Decision, weights: dict):
    model = build_model(train, decision.vocab_size, decision.special_ids)
    model.load_state_dict(ckpt.retie(weights, tied_names(model)))
    return model


def _saved_model(train: TrainParams, decision: Decision, folder: Path):
    """The model of the checkpoint in `folder`, whole, on the CPU."""
    if train.lora.r:
        return lora.trained_model(train, decision.vocab_size, decision.special_ids, ckpt.read_adapters(folder))
    return _model_with_weights(train, decision, ckpt.read_weights(folder))


def _budget_spent(train: TrainParams, decision: Decision, tokenizer_dir: Path, export_dir: Path,
                  trust_remote_code: bool) -> SessionResult:
    step = decision.start_step
    print(budget_spent_message(decision, train))
    if not holds(export_dir, train.export):
        # DVC deletes a non-persistent output before running the stage, and train.export may have changed: rebuild
        # it from the checkpoint, the same bytes as at the end of the session that saved it.
        _export(_saved_model(train, decision, decision.resume.path), train, tokenizer_dir, export_dir,
                trust_remote_code)
        print(f"re-exported the model at step {step} to {export_dir}/")
    return SessionResult(step, step, stopped_by="nothing-to-do")
