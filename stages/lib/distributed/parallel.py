"""The model as the training loop drives it: alone, replicated with DDP, or sharded with FSDP.

- `ddp` keeps a whole model per process and averages gradients after the last micro-step of an optimizer step.
- `fsdp` (PyTorch's `fully_shard`) shards weights, gradients and optimizer state over the processes, gathering one
  transformer block at a time for its forward and backward.
The checkpoint is written in one format whatever the strategy (stages/lib/checkpointing/parts.py gathers and spreads
it).
"""

import contextlib
import inspect
from dataclasses import dataclass, field

import torch

from stages.lib.base.errors import UserError
from stages.lib.distributed.world import World
from stages.lib.modeling.families import tied_names, transformer_blocks
from stages.lib.modeling.loss import LossModule
from stages.lib.modeling.preference_loss import PreferenceLossModule
from stages.lib.tokenizing.batches import IGNORE_INDEX


@dataclass
class ParallelModel:
    """The model as the training loop drives it."""

    model: torch.nn.Module  # the HuggingFace model (under FSDP its parameters are shards)
    module: LossModule  # the model with its loss (under FSDP: sharded in place)
    forward: torch.nn.Module  # what forward passes go through: `module`, or DDP around it
    strategy: str  # single | ddp | fsdp
    tied: list = field(default_factory=list)  # groups of state-dict names that are one tensor, found before sharding

    def gradient_sync(self, last_micro_step: bool):
        """DDP all-reduces gradients only after the last micro-step. FSDP reduce-scatters after each one: skipping
        that would keep whole unsharded gradients between micro-steps, the memory FSDP is there to save."""
        if self.strategy == "ddp" and not last_micro_step:
            return self.forward.no_sync()
        return contextlib.nullcontext()

    def hidden_states(self, inputs: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's last hidden states for `inputs`, every process at once. Under FSDP they are read on the way
        through the root unit, whose forward gathers the shards (and must run before any block's)."""
        trunk = self.model.base_model
        if self.strategy != "fsdp":
            return trunk(input_ids=inputs, position_ids=positions, use_cache=False).last_hidden_state
        seen = []
        hook = trunk.register_forward_hook(lambda module, args, output: seen.append(output.last_hidden_state))
        try:
            self.module(inputs, torch.full_like(inputs, IGNORE_INDEX), positions)  # no target: the loss is 0
        finally:
            hook.remove()
            self.module.reshard()  # the root keeps its gathered weights after a forward: the optimizer wants shards
        return seen[0]


def parallel_model(model: torch.nn.Module, world: World, strategy: str, compile: bool = False,
                   preference: tuple[str, float] | None = None) -> ParallelModel:
    """The model on this process's device: alone, replicated with DDP, or sharded with FSDP. `preference`:
    (train.objective, train.beta) to train on pairs (stages/lib/modeling/preference_loss.py)."""
    tied = tied_names(model)
    if preference:  # one module class per objective; everything else is the same
        def loss_module(m, compile=False):
            return PreferenceLossModule(m, *preference)
    else:
        loss_module = LossModule
    if world.size == 1:
        module = loss_module(model.to(world.device), compile=compile)
        return ParallelModel(model, module, module, "single", tied)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = loss_module(model.to(world.device), compile=compile)
        wrapped = DDP(module, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                      gradient_as_bucket_view=True, **_no_buffer_sync(DDP))
        return ParallelModel(model, module, wrapped, "ddp", tied)
    return _sharded(model, world, compile, tied, loss_module)


def _no_buffer_sync(ddp_class) -> dict:
    # The buffers (rotary frequencies) are constants: no broadcast before every forward. The keyword changed name.
    names = inspect.signature(ddp_class).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def _sharded(model: torch.nn.Module, world: World, compile: bool, tied: list, loss_module=LossModule) -> ParallelModel:
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise UserError(f"train.strategy = fsdp needs torch >= 2.6 (fully_shard); this is torch {torch.__version__}. "
                        "Upgrade torch or use train.strategy: ddp") from None
    from torch.distributed.device_mesh import init_device_mesh
    blocks = transformer_blocks(model)
    if not blocks:
        raise UserError(f"train.strategy = fsdp: no transformer blocks found in this {type(model).__name__} "
                        "(its _no_split_modules names none); use train.strategy: ddp")
    mesh = init_device_mesh(world.device.type, (world.size,))
    for block in blocks:  # one unit per block: gathered for its forward and backward only
        if compile:
            block.compile()  # in place: the state-dict names stay free of `_orig_mod.`
        fully_shard(block, mesh=mesh)
    module = loss_module(model)  # the root unit: embeddings, final norm and head; fully_shard moves it to the device
    fully_shard(module, mesh=mesh)
    return ParallelModel(model, module, module, "fsdp", tied)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (FSDP's gradient norm is a DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
