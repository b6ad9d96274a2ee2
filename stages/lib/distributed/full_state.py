"""The whole model's weights and optimizer state on rank 0, whatever the processes hold, and back.

One process holds them whole. Under DDP every process holds a copy; under FSDP each holds shards. These functions
give rank 0 the state as one process would have it (the model's own parameter names; the optimizer state keyed by
parameter index, as `optimizer.state_dict()` is on one process) and spread rank 0's state to every process, so a
checkpoint has one format for any number of processes and either strategy. Every process must call them.
With LoRA (stages/lib/modeling/lora.py) only the tensors that train travel: `trainable_only` and `partial`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

MODEL_PREFIX = "model."  # LossModule (stages/lib/modeling/loss.py) holds the model as its child `model`

if TYPE_CHECKING:
    import torch

    from stages.lib.distributed.parallel import ParallelModel
    from stages.lib.distributed.world import World


def gather_weights(parallel: ParallelModel, world: World,
                   trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """On rank 0, every state-dict tensor under the model's own names (tied names included), or with
    `trainable_only` the parameters that train alone; None elsewhere."""
    if world.size == 1:
        weights = parallel.model.state_dict()
        return {n: w for n, w in weights.items() if n in _trainable(parallel)} if trainable_only else weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    weights = get_model_state_dict(parallel.forward, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
    if not world.is_main:
        return None
    weights = {name.removeprefix(MODEL_PREFIX): w for name, w in weights.items()}
    # A tied name (lm_head.weight) outlives ignore_frozen_params, which drops each frozen tensor under one name.
    return {n: w for n, w in weights.items() if n in _trainable(parallel)} if trainable_only else weights


def spread_weights(parallel: ParallelModel, world: World, weights: dict | None, partial: bool = False) -> None:
    """Load rank 0's `weights` into every process's model; the others pass None. Every name must be present, or
    with `partial` exactly the parameters that train (the frozen rest stays as it is)."""
    if world.size == 1:
        if partial and set(weights) != _trainable(parallel):
            raise ValueError(f"expected the trained parameters, got {sorted(set(weights) ^ _trainable(parallel))}")
        parallel.model.load_state_dict(weights, strict=not partial)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    full = {MODEL_PREFIX + name: w for name, w in weights.items()} if world.is_main else {}
    set_model_state_dict(parallel.forward, full, options=StateDictOptions(full_state_dict=True,
                                                                          broadcast_from_rank0=True,
                                                                          strict=not partial))


def _trainable(parallel: ParallelModel) -> set[str]:
    return {name for name, p in parallel.model.named_parameters() if p.requires_grad}


def gather_optimizer(parallel: ParallelModel, optimizer: torch.optim.Optimizer, world: World) -> dict | None:
    """On rank 0, the optimizer state keyed by parameter index as on one process; None elsewhere."""
    if world.size == 1:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = get_optimizer_state_dict(parallel.forward, optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _keyed_by_index(state, _parameter_names(parallel, optimizer)) if world.is_main else None


def spread_optimizer(parallel: ParallelModel, optimizer: torch.optim.Optimizer, world: World,
                     state: dict | None) -> None:
    """Load rank 0's optimizer state (keyed by index) into every process's optimizer; the others pass None."""
    if world.size == 1:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    by_name = _keyed_by_name(state, _parameter_names(parallel, optimizer)) if world.is_main else {}
    set_optimizer_state_dict(parallel.forward, optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _parameter_names(parallel: ParallelModel, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name (as torch.distributed.checkpoint calls it) of each optimizer parameter, in one-process index order."""
    names = {id(p): name for name, p in parallel.module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _keyed_by_index(state: dict, names: list[str]) -> dict:
    index = {name: i for i, name in enumerate(names)}
    groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in group.items()},  # betas come back as lists
               "params": [index[name] for name in group["params"]]} for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _keyed_by_name(state: dict, names: list[str]) -> dict:
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[i]: value for i, value in state["state"].items()}, "param_groups": groups}
