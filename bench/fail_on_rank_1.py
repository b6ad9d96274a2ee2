"""The train stage, with a failure made to strike process 1 in the middle of a session: the check that a failure on
one process stops every process at once and that rank 0 shows its message once (stages/lib/distributed/failures.py).

    torchrun --standalone --nproc-per-node=2 bench/fail_on_rank_1.py      (FAULT=... in the environment)

Process 1's third training forward pass fails, in the middle of step 3 (its partner already waits in that step's
gradient all_reduce), with FAULT:
- `user-error`: a UserError (an error for people);
- `out-of-memory`: torch.OutOfMemoryError raised as CUDA raises it (on a machine with one GPU, or a CPU);
- `real-out-of-memory`: a real CUDA out-of-memory: an allocation larger than the GPU's memory.
It leaves the time it failed (time.monotonic()) in the file `failed-at`, for measuring how soon the rest stopped.
"""

import os
import time

import torch

from stages.lib.base.errors import UserError
from stages.lib.modeling.loss import LossModule
from stages.train import main


def fault() -> None:
    kind = os.environ.get("FAULT", "user-error")
    with open("failed-at", "w") as f:
        f.write(str(time.monotonic()))
    if kind == "user-error":
        raise UserError("the data of step 3 cannot be read (a fault made for this check)")
    if kind == "out-of-memory":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a fault made for this check)")
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    torch.empty(2 * total, dtype=torch.uint8, device="cuda")  # more than the GPU has: CUDA's own error


if os.environ.get("RANK") == "1":
    original, calls = LossModule.forward, []

    def failing(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                fault()
        return original(self, *args, **kwargs)
    LossModule.forward = failing

if __name__ == "__main__":
    main()
