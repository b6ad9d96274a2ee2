"""Precision modes of a training session: how forward passes compute, chosen from `train.precision` and the device.

Master weights and optimizer state are fp32 in every mode; precision only changes how forward and backward passes
compute, so it is a session setting that may change between sessions. Adding a mode is one entry here.
"""

import contextlib
from dataclasses import dataclass

import torch

from stages.lib.errors import UserError


@dataclass(frozen=True)
class Precision:
    """One session's precision: its name and the autocast dtype of its forward passes (None: plain fp32)."""

    name: str
    device_type: str
    autocast_dtype: torch.dtype | None = None

    def autocast(self):
        """The context forward passes run in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)


def pick_precision(wanted: str, device: torch.device) -> Precision:
    """fp32 or bf16 (autocast); `auto` is bf16 on GPUs that support it, fp32 elsewhere."""
    bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if wanted == "bf16" and not bf16_ok:
        raise UserError(f"train.precision = bf16 is not supported on {device} (on CPUs bf16 matmuls are far slower "
                        "than fp32); set train.precision: auto or fp32")
    if wanted == "bf16" or (wanted == "auto" and bf16_ok):
        return Precision("bf16", device.type, torch.bfloat16)
    return Precision("fp32", device.type)
