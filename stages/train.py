"""Train stage: one training session that continues the run exactly where the last one stopped.

    python -m stages.train      (dvc repro train / dvc exp run)

Each session resumes from the newest checkpoint of the same run, trains until `train.steps_today` /
`train.minutes_today` (a number of minutes, or auto: the machine's own limit) / the whole budget says stop, saves a
checkpoint, logs to DVCLive, exports the model to `models/<model_name>/`, draws the loss curves and prints a summary.
Once the budget is spent a session changes nothing, and says so before importing torch.

Budget: `total_step_budget` optimizer steps over all sessions, or, when it is 0, `epochs` passes over the training
samples (windows of the token stream, or packed whole documents: `train.packing`, stages/lib/tokenizing/batches.py)
rounded up to whole steps. The learning-rate schedule (`train.schedule`: cosine, or wsd) spans the whole budget, so
splitting a run into sessions changes nothing: on CPU the weights come out bitwise identical. Raising the budget later
continues the run from its checkpoint (stages/lib/training/decision.py says how).

This module is the command's face; a session is put together in stages/lib/training/trainer.py.
"""

import sys

from stages.lib.base.errors import run_stage
from stages.lib.base.params import load_params
from stages.lib.distributed.launcher import under_torchrun
from stages.lib.training.preflight import budget_spent_message, nothing_to_train


def main() -> None:
    """Run one training session with the settings in params.yaml, in several processes when train.devices asks."""
    params = load_params()
    # Processes started by torchrun decide together (rank 0 for all), so only a stage started by itself answers early.
    done = None if under_torchrun() else nothing_to_train(params.train)
    if done is not None:
        print("\n".join([*done.messages, budget_spent_message(done, params.train)]))
        return
    from stages.lib.training.trainer import train_in_processes  # torch and transformers: only when there is work

    sys.exit(train_in_processes(params))


if __name__ == "__main__":
    run_stage(main)
