"""Which device a stage computes on: one rule for train, evaluate and generate."""

import torch

from stages.lib.base.errors import UserError


def pick_device(wanted: str, local_rank: int = 0) -> torch.device:
    """The device to compute on: `auto` takes a GPU when there is one; process `local_rank` of a node takes GPU
    `local_rank`."""
    if wanted == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was asked for (train.device or --device), but torch sees no CUDA GPU; "
                        "use auto or cpu")
    if not (wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    if local_rank >= torch.cuda.device_count():
        raise UserError(f"this is process {local_rank} of its node (LOCAL_RANK), but torch sees "
                        f"{torch.cuda.device_count()} GPU(s): start at most one process per GPU")
    return torch.device("cuda", local_rank)


def visible_gpus(wanted: str) -> int:
    """GPUs a stage may use under `train.device` = `wanted` (0 on CPU)."""
    return torch.cuda.device_count() if wanted != "cpu" and torch.cuda.is_available() else 0
