"""Resume checkpoints: the one module that knows their files. Complete or absent, the latest kept, with a recovery
copy outside DVC's reach.

A checkpoint is a folder `step-00000600/` in `train.checkpoint_dir` made of named parts (PARTS below), each saved
and loaded by its own functions:
- `weights`: `model.safetensors` (tensors shared in the model, such as tied embeddings, stored once);
- `optimizer`: `optimizer.pt` (the optimizer state dict: plain tensors and numbers, read with `weights_only=True`);
- `rng`: `rng.json`, every random generator's state (Python `random`, NumPy, torch CPU and CUDA);
- `logs`: `live/`, the DVCLive logs as of this step, so a session resuming from this checkpoint gets back the rows
  that went with it (`dvc exp run` restores the logs DVC recorded, which may be older);
and `state.json`, written last: format version, step, tokens seen, data cursor, the run's fingerprints, the values
behind them and the learning-rate schedule (the rate is a function of the step under it). Adding a part is one entry in
PARTS. Several processes write the same files: every process takes part in capturing a part (gathering FSDP shards
to rank 0), rank 0 alone writes and reads, and restoring spreads rank 0's state to all, so any checkpoint resumes on
any number of processes with either strategy.

It is written into `.tmp-step-...` in the same parent, fsynced, then renamed into place (stages/lib/files.py), so a
crash leaves either the whole folder or none of it. Only then is the previous checkpoint removed, except the one
saved where a wsd decay began (`extension_point`), which a longer budget continues from.

Recovery copy: `dvc exp run` first checks out the checkpoint recorded in dvc.lock, which would replace a newer
one left by a session that crashed before DVC recorded it. So each checkpoint is also hardlinked into
`.checkpoint-recovery/` at the repository root (git-ignored, not a DVC output), and a session resumes from the newest
complete checkpoint found in either place. To roll back deliberately to the checkpoint DVC restored (after
`git checkout` + `dvc checkout` of an older commit), delete `.checkpoint-recovery/` first.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from stages.lib import live_logs
from stages.lib.files import fresh_folder, publish_folder

if TYPE_CHECKING:  # torch is imported where tensors are handled, so finding checkpoints stays fast
    import torch

    from stages.lib.parallel import ParallelModel
    from stages.lib.world import World

FORMAT_VERSION = 1
RECOVERY_DIR = Path(".checkpoint-recovery")
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
STATE_FILE = "state.json"


@dataclass
class Checkpoint:
    """A complete checkpoint folder and its state.json."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        """Optimizer steps done when it was saved."""
        return self.state["step"]


@dataclass
class Trainee:
    """What a checkpoint saves and restores: the model as trained, its optimizer, the processes, the logs."""

    parallel: ParallelModel
    optimizer: torch.optim.Optimizer
    world: World
    live_dir: Path


@dataclass(frozen=True)
class Part:
    """One named part of a checkpoint and how it travels.

    capture(trainee): called on every process (it may gather); returns what rank 0 writes (None elsewhere).
    write(data, folder): rank 0 writes the captured data into the checkpoint folder being built.
    read(folder): rank 0 reads it back from a complete checkpoint (None when the part is absent).
    restore(trainee, data): called on every process (it may spread rank 0's data); `data` is None off rank 0.
    """

    name: str
    capture: Callable[[Trainee], Any]
    write: Callable[[Any, Path], None]
    read: Callable[[Path], Any]
    restore: Callable[[Trainee, Any], None]


# ---- the parts ----------------------------------------------------------------------------------------------------

def _capture_weights(t: Trainee) -> tuple[dict[str, torch.Tensor], dict | None] | None:
    """On rank 0, the whole model's weights under its own names with each tied group stored once (see `untie`)."""
    if t.world.size == 1:
        return untie(t.parallel.model.state_dict(), t.parallel.tied)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from stages.lib.parallel import MODEL_PREFIX
    weights = get_model_state_dict(t.parallel.forward, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if not t.world.is_main:
        return None
    return untie({name.removeprefix(MODEL_PREFIX): w for name, w in weights.items()}, t.parallel.tied)


def _write_weights(captured: tuple[dict, dict | None], folder: Path) -> None:
    from safetensors.torch import save_file
    kept, metadata = captured
    save_file(kept, str(folder / "model.safetensors"), metadata=metadata)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights on the CPU (tied names stored once, see `retie`)."""
    from safetensors.torch import load_file
    return load_file(Path(folder) / "model.safetensors")


def _restore_weights(t: Trainee, weights: dict | None) -> None:
    if t.world.size == 1:
        t.parallel.model.load_state_dict(retie(weights, t.parallel.tied))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from stages.lib.parallel import MODEL_PREFIX
    full = {MODEL_PREFIX + n: w for n, w in retie(weights, t.parallel.tied).items()} if t.world.is_main else {}
    set_model_state_dict(t.parallel.forward, full, options=StateDictOptions(full_state_dict=True,
                                                                            broadcast_from_rank0=True))


def _capture_optimizer(t: Trainee) -> dict | None:
    """The optimizer state keyed by parameter index, as `optimizer.state_dict()` is on one process, on rank 0."""
    if t.world.size == 1:
        return t.optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    state = get_optimizer_state_dict(t.parallel.forward, t.optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _keyed_by_index(state, _parameter_names(t)) if t.world.is_main else None


def _restore_optimizer(t: Trainee, state: dict | None) -> None:
    if t.world.size == 1:
        t.optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    by_name = _keyed_by_name(state, _parameter_names(t)) if t.world.is_main else {}
    set_optimizer_state_dict(t.parallel.forward, t.optimizer, by_name,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _parameter_names(t: Trainee) -> list[str]:
    """The name (as torch.distributed.checkpoint calls it) of each optimizer parameter, in one-process index order."""
    names = {id(p): name for name, p in t.parallel.module.named_parameters()}
    return [names[id(p)] for group in t.optimizer.param_groups for p in group["params"]]


def _keyed_by_index(state: dict, names: list[str]) -> dict:
    index = {name: i for i, name in enumerate(names)}
    groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in group.items()},  # betas come back as lists
               "params": [index[name] for name in group["params"]]} for group in state["param_groups"]]
    return {"state": {index[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def _keyed_by_name(state: dict, names: list[str]) -> dict:
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in state["param_groups"]]
    return {"state": {names[i]: value for i, value in state["state"].items()}, "param_groups": groups}


def rng_state() -> dict:
    """Every random generator's state as JSON-ready lists."""
    import numpy as np
    import torch
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    """Put back what `rng_state` returned."""
    import numpy as np
    import torch
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _torch():
    import torch
    return torch


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(data: Any, path: Path, indent: int | None = 1) -> None:
    path.write_text(json.dumps(data, indent=indent, sort_keys=True) + "\n", encoding="utf-8")


def _restore_logs(t: Trainee, snapshot: Path | None) -> None:
    # The workspace logs behind this checkpoint (restored older by `dvc exp run`): take the snapshot's instead.
    if t.world.is_main and snapshot is not None and live_logs.restore_logs(snapshot, t.live_dir):
        print(f"restored the logs up to this checkpoint into {t.live_dir}")


PARTS = (
    Part("weights", _capture_weights, _write_weights, read_weights, _restore_weights),
    Part("optimizer", _capture_optimizer, lambda data, folder: _torch().save(data, folder / "optimizer.pt"),
         lambda folder: _torch().load(folder / "optimizer.pt", map_location="cpu", weights_only=True),
         _restore_optimizer),
    Part("rng", lambda t: rng_state() if t.world.is_main else None,
         lambda data, folder: _write_json(data, folder / "rng.json", indent=None),
         lambda folder: _read_json(folder / "rng.json"), lambda t, data: set_rng_state(t.world.share(data))),
    Part("logs", lambda t: t.live_dir if t.world.is_main else None,
         lambda live_dir, folder: live_logs.snapshot_logs(live_dir, folder / "live"),
         lambda folder: folder / "live" if (folder / "live").is_dir() else None, _restore_logs),
)



# ---- saving, finding, restoring -----------------------------------------------------------------------------------

def save(checkpoint_dir: Path, recovery_dir: Path, trainee: Trainee, state: dict) -> dict | None:
    """Save a checkpoint of every part, atomically, mirror it into the recovery folder, then drop older ones in
    both places. Every process calls it; returns rank 0's captured parts (None on the others)."""
    captured = {part.name: part.capture(trainee) for part in PARTS}
    if trainee.world.is_main:
        _publish(Path(checkpoint_dir), Path(recovery_dir), captured, state)
    trainee.world.barrier()  # the checkpoint is whole before any process goes on, or leaves
    return captured if trainee.world.is_main else None


def _publish(checkpoint_dir: Path, recovery_dir: Path, captured: dict, state: dict) -> Path:
    name = folder_name(state["step"])
    final = checkpoint_dir / name
    if not _holds(final, state):  # the same step of the same run saved twice holds the same state: keep the first
        tmp = fresh_folder(checkpoint_dir / f"{TMP_PREFIX}{name}")
        for part in PARTS:
            part.write(captured[part.name], tmp)
        _write_json({"format_version": FORMAT_VERSION, **state}, tmp / STATE_FILE)  # last: marks it complete
        _before_publish(tmp)
        publish_folder(tmp, final)
    mirror(final, recovery_dir)
    for folder in (checkpoint_dir, recovery_dir):
        prune(folder, keep=name, also_keep=extension_point(folder, state))
    return final


def restore(checkpoint: Checkpoint, trainee: Trainee) -> None:
    """Put every part of `checkpoint` back into the trainee; every process calls it, rank 0 alone reads."""
    for part in PARTS:
        part.restore(trainee, part.read(checkpoint.path) if trainee.world.is_main else None)


def folder_name(step: int) -> str:
    """`step-00000600` for step 600 (zero-padded so folders sort by step)."""
    return f"{PREFIX}{step:08d}"


def find_checkpoints(folders: list[Path]) -> list[Checkpoint]:
    """Complete checkpoints in the given folders, newest first.

    Two copies of the same run's step (same fingerprint) count once, the earlier folder's; the same step of two
    different runs (another seed, say) are both kept, so the caller can pick the one of its run.
    """
    found: dict[tuple[int, str], Checkpoint] = {}
    for folder in folders:
        for path in sorted(Path(folder).glob(f"{PREFIX}*")) if Path(folder).is_dir() else []:
            state = _read_state(path)
            if state is not None:
                found.setdefault((state["step"], state["fingerprint"]), Checkpoint(path, state))
    return sorted(found.values(), key=lambda c: c.step, reverse=True)


def _read_state(path: Path) -> dict | None:
    try:
        state = _read_json(path / STATE_FILE)
    except (OSError, ValueError):
        return None
    if state.get("format_version") != FORMAT_VERSION:
        return None
    return state


def _holds(path: Path, state: dict | None) -> bool:
    """Whether `path` is a complete checkpoint of the same step of the same run as `state`.

    The same folder name can hold another run's checkpoint (DVC restores the committed run's step 2 while a new run
    saves its own step 2), which must then be replaced, not kept.
    """
    found = _read_state(path)
    return found is not None and state is not None and (found["step"], found["fingerprint"]) == (
        state["step"], state["fingerprint"])


def bring_back(checkpoint: Checkpoint, checkpoint_dir: Path) -> Checkpoint:
    """The recovery copy `checkpoint` put back where DVC records it, the older checkpoint there removed."""
    restored = Checkpoint(mirror(checkpoint.path, checkpoint_dir), checkpoint.state)
    prune(checkpoint_dir, keep=restored.path.name, also_keep=extension_point(checkpoint_dir, checkpoint.state))
    return restored


def mirror(checkpoint: Path, folder: Path) -> Path:
    """Put a copy of `checkpoint` into `folder` (hardlinks where possible), atomically; return its path there."""
    target = Path(folder) / checkpoint.name
    if _holds(target, _read_state(checkpoint)):
        return target
    tmp = fresh_folder(Path(folder) / f"{TMP_PREFIX}{checkpoint.name}")
    for f in sorted(checkpoint.rglob("*")):
        copy = tmp / f.relative_to(checkpoint)
        if f.is_dir():
            copy.mkdir()
            continue
        try:
            os.link(f, copy)
        except OSError:  # another filesystem, or links not allowed: copy instead
            shutil.copyfile(f, copy)
    publish_folder(tmp, target)
    return target


def prune(folder: Path, keep: str, also_keep: str | None = None) -> None:
    """Remove every checkpoint and leftover temporary folder in `folder` except `keep` (and `also_keep`)."""
    if not Path(folder).is_dir():
        return
    for path in Path(folder).iterdir():
        if path.name not in (keep, also_keep) and path.is_dir() and path.name.startswith((PREFIX, TMP_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def extension_point(folder: Path, state: dict) -> str | None:
    """The folder name of the newest checkpoint in `folder` saved where its run's learning-rate decay began (state
    `pre_decay`, see stages/lib/schedule.py) of the same run as `state`, no newer than it: a longer budget continues
    the run exactly from there (stages/lib/decision.py), so pruning keeps it beside the latest."""
    for found in find_checkpoints([folder]):
        if found.state.get("pre_decay") and found.state.get("run") == state.get("run") and found.step <= state["step"]:
            return found.path.name
    return None


def untie(weights: dict[str, torch.Tensor], tied: list[list[str]]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The weights with each tied group stored once, as safetensors' `save_model` does it: the first name in sorted
    order is kept, and the metadata maps each dropped name to the kept one."""
    kept = dict(weights)
    metadata = {}
    for names in tied:
        for dropped in names[1:]:
            kept.pop(dropped, None)
            metadata[dropped] = names[0]
    return {k: v.contiguous() for k, v in kept.items()}, metadata or None


def retie(weights: dict[str, torch.Tensor], tied: list[list[str]]) -> dict[str, torch.Tensor]:
    """The weights with every name of each tied group present again (all pointing to the one stored tensor)."""
    full = dict(weights)
    for names in tied:
        stored = next((full[name] for name in names if name in full), None)
        if stored is not None:
            full.update({name: stored for name in names})
    return full


def _before_publish(tmp: Path) -> None:
    """Called with the written, not yet renamed folder; tests replace it to kill a process mid-save."""
