"""Before a session imports torch: what its decision is made from, and the quick answer when there is nothing to do.

`read_inputs` gathers the decision's Inputs (stages/lib/training/decision.py) from the files: the checkpoints found in
`train.checkpoint_dir` and the recovery copy, whether logs exist, the content hash of `train.init_from`'s model. The
train stage's full path adds the tokenizer's facts (which need transformers) and decides on rank 0.

`nothing_to_train` makes the same decision with placeholders for the tokenizer's facts, which change neither the
checkpoint chosen nor the run's length: when the run's budget is spent, DVC's copy of the checkpoint is the one to
resume and the export is in place, the session has nothing to do and answers before torch or transformers is
imported (a no-op `dvc repro` then costs DVC's own time, not 4 s of imports). In every other case the stage takes its
full path, which decides again with the real facts and reaches the same answer.
"""

from pathlib import Path

from stages.lib.base.params import MODELS_DIR, TOKENIZER_DIR, TOKENS_DIR, TrainParams
from stages.lib.checkpointing import store
from stages.lib.checkpointing.hashing import model_digest
from stages.lib.checkpointing.live_logs import has_logs
from stages.lib.modeling.model_folders import holds
from stages.lib.tokenizing.token_files import packing_for, read_meta
from stages.lib.training.decision import Decision, Inputs, decide


def read_inputs(train: TrainParams, meta: dict, samples_per_epoch: int, vocab_size: int, special_ids: dict,
                recovery_dir: Path) -> Inputs:
    """The decision's inputs as the files in the workspace give them."""
    checkpoint_dir = Path(train.checkpoint_dir)
    base_model = model_digest(train.init_from) if train.init_from else None
    return Inputs(meta, samples_per_epoch, vocab_size, special_ids, base_model,
                  store.find(checkpoint_dir, recovery_dir), checkpoint_dir, has_logs(Path(train.out_dir) / "live"))


def nothing_to_train(train: TrainParams, tokens_dir: Path = TOKENS_DIR, tokenizer_dir: Path = TOKENIZER_DIR,
                     models_dir: Path = MODELS_DIR, recovery_dir: Path | None = None) -> Decision | None:
    """The session's Decision when it has nothing to do (see the module docstring), else None."""
    recovery_dir = store.default_recovery_dir() if recovery_dir is None else recovery_dir
    if train.resume == "never" or not Path(tokenizer_dir).is_dir() or not (Path(tokens_dir) / "meta.json").exists():
        return None
    meta = read_meta(tokens_dir)
    found_dir = Path(train.checkpoint_dir)
    if not found_dir.is_dir() or not holds(Path(models_dir) / train.model_name, train.export):
        return None
    if train.total_step_budget == 0 and packing_for(meta, train.packing) == "documents":
        return None  # the run's length depends on how documents pack, which the full path computes
    windows = max(0, (meta["splits"]["train"]["tokens"] - 1) // train.seq_len)
    inputs = read_inputs(train, meta, windows, 0, {}, recovery_dir)
    world_size = train.devices if isinstance(train.devices, int) else (
        inputs.found.checkpoints[0].state.get("world_size", 1) if inputs.found.checkpoints else 1)
    decision = decide(train, inputs, world_size)
    if decision.resume is None or decision.from_recovery or decision.start_step < decision.plan.total_steps:
        return None
    return decision


def budget_spent_message(decision: Decision, train: TrainParams) -> str:
    """What a session says when the run's budget is spent, and how to train further."""
    budget = "train.total_step_budget" if train.total_step_budget else "train.epochs (or set train.total_step_budget)"
    if train.schedule == "wsd":
        how = "exactly as if the larger budget had been set from the start (wsd)"
    else:
        how = ("with the learning rate re-planned over the added steps, from where it is (cosine; train.schedule: "
               "wsd makes extensions exact)")
    return (f"the run's budget of {decision.plan.total_steps} steps is spent (checkpoint at step "
            f"{decision.start_step}): nothing to train. To train further, raise {budget}, e.g. "
            f"`dvc exp run -S train.total_step_budget={2 * decision.plan.total_steps}`: the run continues from its "
            f"checkpoint, {how}.")
