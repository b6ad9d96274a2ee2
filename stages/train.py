"""Train stage: one training session that continues the run exactly where the last one stopped.

    python -m stages.train      (dvc repro train / dvc exp run)

Each session resumes from the newest checkpoint of the same run, trains until `train.steps_today` /
`train.minutes_today` / the whole budget says stop, saves a checkpoint, logs to DVCLive and exports the model to
`models/<model_name>/`. Once the budget is spent a session changes nothing.

Budget: `total_step_budget` optimizer steps over all sessions, or, when it is 0, `epochs` passes over the training
samples (windows of the token stream, or packed whole documents: `train.packing`, stages/lib/batches.py) rounded up
to whole steps. The learning-rate schedule (linear warmup, cosine to min_lr) spans the whole budget, so splitting a
run into sessions changes nothing: on CPU the weights come out bitwise identical. Weight decay applies to matrices,
embeddings included, not to norms or biases.

The story of a session, and where each part lives:
1. start one process per device when `train.devices` asks for several (stages/lib/launcher.py, world.py);
2. decide, once, on rank 0: the run's fingerprint, the checkpoint to resume and this session's grad_accum
   (stages/lib/decision.py; the checkpoint format is stages/lib/checkpoint.py);
3. build the model (stages/lib/model.py), wrap it for the processes (parallel.py), restore the checkpoint;
4. run the loop (stages/lib/session.py), then export (stages/lib/export.py).
"""

import hashlib
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from stages.lib import checkpoint as ckpt
from stages.lib.batches import TrainBatches, describe_samples, split_samples
from stages.lib.decision import Decision, Inputs, decide
from stages.lib.devices import pick_device
from stages.lib.errors import UserError, run_stage
from stages.lib.export import export_model
from stages.lib.launcher import exit_code_to_report, launch, processes_to_start, under_torchrun
from stages.lib.live_logs import has_logs
from stages.lib.model import build_model, keeps_documents_apart, pick_document_attention, tied_names
from stages.lib.parallel import parallel_model
from stages.lib.params import MODELS_DIR, TOKENIZER_DIR, TOKENS_DIR, TrainParams, load_params
from stages.lib.precision import pick_precision
from stages.lib.schedule import session_end
from stages.lib.session import Session, SessionResult
from stages.lib.token_files import dominant_documents, packing_for, read_meta
from stages.lib.world import World, joined_world


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
    live_dir = Path(train.out_dir) / "live"
    meta = read_meta(tokens_dir)
    packing = packing_for(meta, train.packing)
    train_samples = split_samples(tokens_dir, "train", train.seq_len, packing, train.seed, required=True)
    val_samples = (split_samples(tokens_dir, "val", train.seq_len, packing, None, required=False)
                   if "val" in meta["splits"] else None)
    decision = Decision.from_json(world.decide_on_main(lambda: decide_on_main(
        train, meta, train_samples.count, tokenizer_dir, recovery_dir, trust_remote_code, world.size).as_json()))
    train = decision.session_params(train)
    start, total = decision.start_step, decision.plan.total_steps
    export_dir = Path(models_dir) / train.model_name
    if start >= total:
        if world.is_main:
            return _budget_spent(train, decision, tokenizer_dir, export_dir)
        return SessionResult(start, start, stopped_by="nothing-to-do")

    trainee = build_trainee(train, decision, world, live_dir)
    batches = TrainBatches(train_samples, train.seed, train.batch_size, train.grad_accum, world.size, world.rank)
    precision = pick_precision(train.precision, world.device)
    session = Session(train, decision, trainee, precision, batches, val_samples, started, recovery_dir)
    end = session_end(start, total, train.steps_today)
    if world.is_main:
        parameters = sum(p.numel() for p in trainee.parallel.model.parameters())
        print(f"run of {total} steps ({decision.plan.fingerprint}): this session trains steps {start} -> {end} on "
              f"{world.describe(train.strategy)} ({precision.name}), {parameters:,} parameters")
        for line in [describe_samples(train_samples.facts(), train.seq_len), *dominant_documents(meta)]:
            print(line)
    result = session.run(start, end)
    if result.trained and world.is_main:
        export_model(_model_to_export(session, train, decision), tokenizer_dir, export_dir)
        print(f"exported the model at step {result.end_step} to {export_dir}/")
    return result


def decide_on_main(train: TrainParams, meta: dict, samples_per_epoch: int, tokenizer_dir: Path, recovery_dir: Path,
                   trust_remote_code: bool, world_size: int) -> Decision:
    """Rank 0's decision: read what it is made from, decide, say it, and bring a recovery copy back into place."""
    vocab_size, special_ids = _tokenizer_facts(tokenizer_dir, trust_remote_code, meta)
    checkpoint_dir = Path(train.checkpoint_dir)
    inputs = Inputs(meta, samples_per_epoch, vocab_size, special_ids, _base_model_identity(train.init_from),
                    ckpt.find_checkpoints([checkpoint_dir, recovery_dir]), checkpoint_dir,
                    has_logs(Path(train.out_dir) / "live"))
    decision = decide(train, inputs, world_size)
    for message in decision.messages:
        print(message)
    if decision.from_recovery:  # put it back where DVC will record it
        return replace(decision, resume=ckpt.bring_back(decision.resume, checkpoint_dir))
    return decision


def _tokenizer_facts(tokenizer_dir: Path, trust_remote_code: bool, meta: dict) -> tuple[int, dict]:
    """The model's vocabulary size and the tokenizer's special token ids."""
    if not Path(tokenizer_dir).is_dir():
        raise UserError(f"{tokenizer_dir} not found: run the tokenizer stage first (dvc repro tokenizer)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return max(len(tokenizer), meta["vocab_size"]), special


def _base_model_identity(init_from: str) -> dict | None:
    """What identifies the pretrained model in `train.init_from` for the run's fingerprint."""
    if not init_from:
        return None
    config = Path(init_from) / "config.json"
    return {"init_from_config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None}


def build_trainee(train: TrainParams, decision: Decision, world: World, live_dir: Path) -> ckpt.Trainee:
    """The run's model and optimizer on this process, wrapped for the processes, with the checkpoint restored."""
    _seed_everything(train.seed)
    model = build_model(train, decision.vocab_size, decision.special_ids)
    if decision.plan.values["packing"] == "documents":
        if not keeps_documents_apart(model):
            raise UserError(f"train.packing = documents, but this {type(model).__name__} ignores the position ids "
                            "that keep packed documents apart, so they would attend to each other; set "
                            "train.packing: stream")
        pick_document_attention(model, world.device, pick_precision(train.precision, world.device).autocast_dtype)
    parallel = parallel_model(model, world, train.strategy, train.compile)
    trainee = ckpt.Trainee(parallel, make_optimizer(parallel.model, train), world, live_dir)
    if decision.resume is not None:
        ckpt.restore(decision.resume, trainee)
    return trainee


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


def _model_to_export(session: Session, train: TrainParams, decision: Decision):
    if session.parallel.strategy != "fsdp":
        return session.parallel.model
    # The shards are spread over the processes: a whole model from the weights the last save gathered.
    return _model_with_weights(train, decision, session.last_saved["weights"][0])


def _model_with_weights(train: TrainParams, decision: Decision, weights: dict):
    model = build_model(train, decision.vocab_size, decision.special_ids)
    model.load_state_dict(ckpt.retie(weights, tied_names(model)))
    return model


def _budget_spent(train: TrainParams, decision: Decision, tokenizer_dir: Path, export_dir: Path) -> SessionResult:
    step = decision.start_step
    print(f"the run's budget of {decision.plan.total_steps} steps is spent (checkpoint at step {step}): nothing "
          "to train. To train further, raise train.total_step_budget (or epochs), which starts a new run.")
    if not (export_dir / "config.json").exists():
        # DVC deletes a non-persistent output before running the stage: rebuild it, same bytes as before.
        export_model(_model_with_weights(train, decision, ckpt.read_weights(decision.resume.path)), tokenizer_dir,
                     export_dir)
        print(f"re-exported the model at step {step} to {export_dir}/")
    return SessionResult(step, step, stopped_by="nothing-to-do")


if __name__ == "__main__":
    run_stage(main)
