"""Resume checkpoints: complete or absent, the latest kept, with a recovery copy outside DVC's reach.

A checkpoint is a folder `step-00000600/` in `train.checkpoint_dir` holding
- `model.safetensors`: the weights (shared tensors such as tied embeddings stored once);
- `optimizer.pt`: the optimizer state dict (plain tensors and numbers, read back with `weights_only=True`);
- `rng.json`: every random generator's state (Python `random`, NumPy, torch CPU and CUDA);
- `state.json`: format version, step, tokens seen, data cursor, the run's fingerprint and the values behind it.
The learning rate needs no saving: it is a function of the step. A multi-process run writes the same files (rank 0
gathers the full weights and optimizer state, keyed as on one process), so any checkpoint resumes on any number of
processes and either strategy.

It is written into `.tmp-step-...` in the same parent, fsynced, then renamed into place, so a crash leaves either
the whole folder or none of it. Only then is the previous checkpoint removed. Files are always new files, never
rewritten in place, because DVC's cache may be hardlinked to them.

Recovery copy: `dvc exp run` first checks out the checkpoint recorded in dvc.lock, which would replace a newer
one left by a session that crashed before DVC recorded it. So each checkpoint is also hardlinked into
`.checkpoint-recovery/` at the repository root (git-ignored, not a DVC output), and a session resumes from the newest
complete checkpoint found in either place. To roll back deliberately to the checkpoint DVC restored (after
`git checkout` + `dvc checkout` of an older commit), delete `.checkpoint-recovery/` first.
"""

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

FORMAT_VERSION = 1
RECOVERY_DIR = Path(".checkpoint-recovery")
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


@dataclass
class Checkpoint:
    """A complete checkpoint folder and its state.json."""

    path: Path
    state: dict

    @property
    def step(self) -> int:
        """Optimizer steps done when it was saved."""
        return self.state["step"]


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
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("format_version") != FORMAT_VERSION:
        return None
    return state


def save_checkpoint(checkpoint_dir: Path, recovery_dir: Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write a checkpoint atomically, mirror it into the recovery folder, then drop older ones in both places."""
    def write(tmp: Path) -> None:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    return _save(checkpoint_dir, recovery_dir, state, write)


def save_gathered_checkpoint(checkpoint_dir: Path, recovery_dir: Path, weights: dict[str, torch.Tensor],
                             tied: list[list[str]], optimizer_state: dict, state: dict) -> Path:
    """`save_checkpoint` for state gathered from several processes, giving the same files.

    `weights` holds every state-dict name, tied ones included (`tied`: groups of names that are one tensor in the
    model); `optimizer_state` is keyed as `optimizer.state_dict()` is on one process.
    """
    def write(tmp: Path) -> None:
        kept, metadata = untie(weights, tied)
        save_file(kept, str(tmp / "model.safetensors"), metadata=metadata)
        torch.save(optimizer_state, tmp / "optimizer.pt")
    return _save(checkpoint_dir, recovery_dir, state, write)


def _save(checkpoint_dir: Path, recovery_dir: Path, state: dict, write_weights_and_optimizer) -> Path:
    checkpoint_dir, name = Path(checkpoint_dir), folder_name(state["step"])
    final = checkpoint_dir / name
    if not _holds(final, state):  # the same step of the same run saved twice holds the same state: keep the first
        tmp = _fresh_folder(checkpoint_dir / f"{TMP_PREFIX}{name}")
        write_weights_and_optimizer(tmp)
        _write_json(tmp / "rng.json", rng_state(), indent=None)
        _write_json(tmp / "state.json", {"format_version": FORMAT_VERSION, **state})  # last: marks it complete
        _publish(tmp, final)
    mirror(final, recovery_dir)
    prune(checkpoint_dir, keep=name)
    prune(recovery_dir, keep=name)
    return final


def _holds(path: Path, state: dict | None) -> bool:
    """Whether `path` is a complete checkpoint of the same step of the same run as `state`.

    The same folder name can hold another run's checkpoint (DVC restores the committed run's step 2 while a new run
    saves its own step 2), which must then be replaced, not kept.
    """
    found = _read_state(path)
    return found is not None and state is not None and (found["step"], found["fingerprint"]) == (
        state["step"], state["fingerprint"])


def mirror(checkpoint: Path, folder: Path) -> Path:
    """Put a copy of `checkpoint` into `folder` (hardlinks where possible), atomically; return its path there."""
    target = Path(folder) / checkpoint.name
    if _holds(target, _read_state(checkpoint)):
        return target
    tmp = _fresh_folder(Path(folder) / f"{TMP_PREFIX}{checkpoint.name}")
    for f in sorted(checkpoint.iterdir()):
        try:
            os.link(f, tmp / f.name)
        except OSError:  # another filesystem, or links not allowed: copy instead
            shutil.copyfile(f, tmp / f.name)
    _publish(tmp, target)
    return target


def prune(folder: Path, keep: str) -> None:
    """Remove every checkpoint and leftover temporary folder in `folder` except `keep`."""
    if not Path(folder).is_dir():
        return
    for path in Path(folder).iterdir():
        if path.name != keep and path.is_dir() and path.name.startswith((PREFIX, TMP_PREFIX)):
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(checkpoint: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    device: torch.device) -> None:
    """Restore weights, optimizer state and random generators from a checkpoint."""
    load_model(model, str(checkpoint.path / "model.safetensors"), device=str(device))
    optimizer.load_state_dict(torch.load(checkpoint.path / "optimizer.pt", map_location=device, weights_only=True))
    set_rng_state(json.loads((checkpoint.path / "rng.json").read_text(encoding="utf-8")))


def read_checkpoint(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The weights (tied names stored once, see `retie`), optimizer state and generator states, on the CPU."""
    weights = load_file(checkpoint.path / "model.safetensors")
    optimizer_state = torch.load(checkpoint.path / "optimizer.pt", map_location="cpu", weights_only=True)
    return weights, optimizer_state, json.loads((checkpoint.path / "rng.json").read_text(encoding="utf-8"))


def tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor in `model` (tied embeddings), each group sorted."""
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    in_state = set(model.state_dict())
    for name, tensor in named:
        if name in in_state:
            groups.setdefault(id(tensor), []).append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


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


def load_weights(checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """Restore only the weights (for exporting a finished run)."""
    load_model(model, str(checkpoint.path / "model.safetensors"))


def rng_state() -> dict:
    """Every random generator's state as JSON-ready lists."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []
    return {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    """Put back what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _before_publish(tmp: Path) -> None:
    """Called with the written, not yet renamed folder; tests replace it to kill a process mid-save."""


def _publish(tmp: Path, final: Path) -> None:
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    _before_publish(tmp)
    if final.exists():  # an incomplete folder of the same name (no state.json): never resumable, replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def _fresh_folder(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _write_json(path: Path, data: dict, indent: int | None = 1) -> None:
    path.write_text(json.dumps(data, indent=indent, sort_keys=True) + "\n", encoding="utf-8")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
