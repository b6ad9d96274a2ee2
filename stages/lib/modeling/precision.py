"""Precision modes of a training session, chosen from `train.precision` and the device, and fp16's loss scaler.

- `fp32`: plain fp32 (TF32 matmuls on GPUs that have them).
- `bf16`: autocast to bfloat16. Only on GPUs with native bf16, compute capability 8.0 or higher (A100, H100, L4,
  RTX 30xx and later). `torch.cuda.is_bf16_supported()` says yes on a T4 or V100 too, where bf16 is emulated and
  slow, so the capability decides here.
- `fp16`: autocast to float16 with dynamic loss scaling (`torch.amp.GradScaler`), for the GPUs whose tensor cores
  do fp16 but not bf16 (T4, V100; the P100 has fast fp16 without tensor cores). The loss is multiplied by a scale
  before the backward pass so that small gradients survive in fp16; gradients are unscaled before clipping; a step
  whose gradients hold an inf or a nan is skipped and the scale halved (it doubles after 2,000 clean steps).
- `auto`: bf16 on GPUs with native bf16, fp16 on those with fast fp16, fp32 on older GPUs and on CPUs.

A skipped step is still a step: its batch is consumed, and the learning rate and data position of every later step
stay functions of the step number, exactly as in an uninterrupted run. Skipped steps are counted over the run.
An overflow in the forward pass (weights or activations beyond fp16's largest value, 65,504: a base trained in bf16,
or a frozen 16-bit base) is past what any loss scale fixes: every step is skipped. So a session gives up (`gives_up`)
after 20 skipped steps in a row, or once more than 2% of its steps after its first 100 (the scale settles in those)
were skipped, counted over at least 100 steps; it saves a checkpoint and says what to try.

Master weights and optimizer state are fp32 in every mode; precision only changes how forward and backward passes
compute, so it is a session setting that may change between sessions (fp16 on a T4 today, bf16 on an A100
tomorrow). The scaler's state is a checkpoint part (stages/lib/checkpointing/parts.py) that sessions which do not scale
keep as they found it, so a later fp16 session goes on with the scale the last one reached.
"""

import contextlib
from dataclasses import dataclass

import torch

from stages.lib.base.errors import UserError

NATIVE_BF16 = (8, 0)  # compute capability from which a GPU computes bf16 in hardware


@dataclass(frozen=True)
class Precision:
    """One session's precision: its name, the autocast dtype of its passes (None: plain fp32), and whether the loss
    is scaled (fp16)."""

    name: str
    device_type: str
    autocast_dtype: torch.dtype | None = None

    @property
    def scales_loss(self) -> bool:
        """Whether the session needs dynamic loss scaling (fp16's narrow exponent range)."""
        return self.autocast_dtype == torch.float16

    def autocast(self):
        """The context forward passes run in."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.autocast_dtype)

    def describe(self) -> str:
        """`fp16 with loss scaling`, `bf16`, `fp32`, for messages."""
        return f"{self.name} with loss scaling" if self.scales_loss else self.name


MODES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_precision(wanted: str, device: torch.device, warn: bool = True) -> Precision:
    """The Precision for `train.precision` = `wanted` on `device` (see the module docstring)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    name = precision_for(wanted, capability, torch.cuda.get_device_name(device) if capability else str(device))
    if device.type == "cpu" and name != "fp32" and warn:
        print(f"warning: train.precision = {name} on a CPU computes correctly but far slower than fp32 (CPUs have "
              "no fast 16-bit matmuls); it is there to try the GPU path on small models. Train with auto or fp32")
    return Precision(name, device.type, MODES[name])


def precision_for(wanted: str, capability: tuple[int, int] | None, where: str = "this GPU") -> str:
    """The mode's name for `wanted` on a GPU of compute `capability` (None: a CPU); a UserError for bf16 on a GPU
    that only emulates it."""
    if wanted == "auto":
        if capability is None:
            return "fp32"
        if capability >= NATIVE_BF16:
            return "bf16"
        return "fp16" if has_fast_fp16(capability) else "fp32"
    if wanted == "bf16" and capability is not None and capability < NATIVE_BF16:
        major, minor = capability
        raise UserError(f"train.precision = bf16, but {where} (compute capability {major}.{minor}) has no native "
                        "bf16: it would be emulated, slower than fp32 (native bf16 starts at compute capability 8.0, "
                        "the A100). Set train.precision: fp16 (fp16 autocast with loss scaling, which this GPU "
                        "computes fast) or auto, which picks it")
    return wanted


def has_fast_fp16(capability: tuple[int, int]) -> bool:
    """Volta and later (7.0+: tensor cores) and the P100 (6.0); other Pascal and older GPUs run fp16 slowly."""
    return capability >= (7, 0) or capability == (6, 0)


def inference_dtype(weights: torch.dtype, capability: tuple[int, int] | None) -> torch.dtype:
    """The dtype to generate in, for a model whose files hold `weights`, on a GPU of compute `capability` (None: a
    CPU): fp32 on a CPU (16-bit matmuls are slow there); bf16 weights on a GPU without native bf16 in fp16 where it
    computes fast (a T4 or V100; bf16's range fits a trained model's weights and activations), else fp32."""
    if capability is None:
        return torch.float32
    if weights == torch.bfloat16 and capability < NATIVE_BF16:
        return torch.float16 if has_fast_fp16(capability) else torch.float32
    return weights


GIVE_UP_IN_A_ROW = 20  # skipped steps in a row after which fp16 stops the session
GIVE_UP_SHARE = 0.02  # or this share of the steps skipped, counted after the session's first SETTLING_STEPS
SETTLING_STEPS = 100


def gives_up(in_a_row: int, session_steps: int, skipped_after_settling: int) -> str | None:
    """Why fp16 stops the session (None: it goes on), from the skipped steps in a row, the steps the session made
    and the steps skipped among those after its first SETTLING_STEPS."""
    if in_a_row >= GIVE_UP_IN_A_ROW:
        return f"the last {in_a_row} steps were all skipped"
    counted = session_steps - SETTLING_STEPS
    if counted >= SETTLING_STEPS and skipped_after_settling > GIVE_UP_SHARE * counted:
        return (f"{skipped_after_settling} of the {counted} steps after the session's first {SETTLING_STEPS} were "
                f"skipped (more than {GIVE_UP_SHARE:.0%})")
    return None


def overflow_message(why: str, step: int) -> str:
    """What a session that gave up on fp16 says: why, what it kept, and what to try."""
    return (f"fp16 cannot train this model: {why}, their gradients inf or nan whatever the loss scale (now down to "
            "its floor), so the session learned nothing and stopped. The usual cause is an overflow in the forward "
            "pass, which no loss scale fixes: weights or activations beyond fp16's largest value (65,504), as in a "
            f"base trained in bf16. The checkpoint at step {step} holds the run as it was. Try, in this order: "
            "train.precision: bf16 on a GPU that has it (compute capability 8.0 or later: A100, L4, H100, RTX 30xx "
            "and later); train.precision: fp32 (slower, twice the activation memory); a lower train.lr if the loss "
            "rose before the skips began")


class LossScaler:
    """fp16's dynamic loss scaling around the optimizer step, and the run's count of skipped steps.

    Disabled (every mode but fp16) it scales nothing and keeps the scaler state it was restored with. With FSDP the
    gradients are shards, so the inf/nan check is all-reduced over the processes (`sharded`).
    """

    def __init__(self, enabled: bool, device_type: str, sharded: bool = False):
        if sharded and enabled:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.grad_scaler = ShardedGradScaler(device_type)
        else:
            self.grad_scaler = torch.amp.GradScaler(device_type, enabled=enabled)
        self.enabled = enabled
        self.skipped_steps = 0  # over the whole run, restored from the checkpoint
        self.skipped_in_a_row = 0  # this session's latest steps, all skipped
        self._kept: dict = {}  # the checkpoint's scaler state, kept while this session does not scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to call backward on (multiplied by the current scale in fp16)."""
        return self.grad_scaler.scale(loss) if self.enabled else loss

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale in place, so clipping and the logged norm see their true size."""
        if self.enabled:
            self.grad_scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> bool:
        """The optimizer step, unless the gradients hold an inf or a nan; then the scale's update. True when the
        step was taken.

        `grad_norm`: the norm of all the unscaled gradients (every process's shards), inf or nan exactly when one of
        them is. Deciding from it rather than through GradScaler.step keeps every process's decision the same and
        works with fused AdamW under FSDP, whose sharded scaler hands the fused kernel an inf flag it rejects.
        """
        if not self.enabled:
            optimizer.step()
            return True
        taken = bool(torch.isfinite(grad_norm))
        if taken:
            optimizer.step()
        self.grad_scaler.update()  # from the inf checks `unscale` recorded: back off, or count a clean step
        self.skipped_steps += not taken
        self.skipped_in_a_row = 0 if taken else self.skipped_in_a_row + 1
        return taken

    def current_scale(self) -> float | None:
        """The loss scale now (None when not scaling)."""
        return self.grad_scaler.get_scale() if self.enabled else None

    def describe(self, steps: int, skipped_before: int) -> str:
        """What scaling did in a session of `steps` steps that started with `skipped_before` skipped in the run."""
        return (f"fp16 loss scaling: {self.skipped_steps - skipped_before} of {steps} steps skipped this session "
                f"(inf/nan gradients; their batches are used all the same), {self.skipped_steps} in the run; "
                f"loss scale now {self.current_scale():g}")

    def state_dict(self) -> dict:
        """JSON-ready state: the skipped steps and GradScaler's own state (scale, growth tracker)."""
        scaler = self.grad_scaler.state_dict() if self.enabled else self._kept
        return {"skipped_steps": self.skipped_steps, "grad_scaler": scaler}

    def load_state_dict(self, state: dict) -> None:
        """Put back what `state_dict` returned."""
        self.skipped_steps = state["skipped_steps"]
        if self.enabled and state["grad_scaler"]:
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        elif not self.enabled:
            self._kept = state["grad_scaler"]
