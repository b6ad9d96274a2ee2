"""The resume checkpoint's format: the one module that knows what a checkpoint folder holds.

A checkpoint is a folder `step-00000600/` made of named parts (PARTS below), each saved and loaded by its own
functions, and nothing in it is a pickle:
- `weights`: `model.safetensors` (tensors shared in the model, such as tied embeddings, stored once);
- or, when the model trains LoRA adapters on a frozen base (stages/lib/modeling/lora.py), `adapters`:
  `adapters.safetensors`, the adapter tensors alone (megabytes where the base is gigabytes: the base is
  train.init_from, fingerprinted by its content); state.json's `model_tensors` says which of the two it holds;
- `optimizer`: `optimizer.safetensors` (every state tensor, named `<parameter index>.<name>`; state an optimizer
  nests, as bitsandbytes' 8-bit AdamW nests its quantized moments, `<parameter index>.<outer>.<name>`) and
  `optimizer.json` (the parameter groups and any state that is not a tensor, named alike);
- `rng`: `rng.json`, every random generator's state (Python `random`, NumPy, torch CPU and CUDA) of rank 0 (of the
  one process), and `rng-rank<r>.json` each other process's own (stages/lib/checkpointing/rng.py; a process with no
  file of its own, as in checkpoints saved before they had them, takes rank 0's);
- `scaler`: `scaler.json`, fp16's loss scale and the run's count of skipped steps (stages/lib/modeling/precision.py;
  absent from checkpoints of sessions with no loss scaler);
- `logs`: `live/`, the DVCLive logs as of this step, so a session resuming from this checkpoint gets back the rows
  that went with it (`dvc exp run` restores the logs DVC recorded, which may be older);
and `state.json`, written last: format version, step, tokens seen, data cursor, the run's fingerprints, the values
behind them and the learning-rate schedule (the rate is a function of the step under it). Adding a part is one entry
in PARTS. Every process takes part in capturing a part (gathering FSDP shards to rank 0,
stages/lib/distributed/full_state.py); rank 0 alone writes and reads; restoring spreads rank 0's state to all, so any
checkpoint resumes on any number of processes with either strategy.

Format 3 added the `adapters` part and `model_tensors` (a format 2 checkpoint holds weights). Format 1 kept the
optimizer state in `optimizer.pt` (torch.save, a pickle). It is still read, once, with
`torch.load(weights_only=True)` on a torch that has the fix for advisory GHSA-63cw-57p8-fm3p (2.10 or later), and
the next save writes the current format. A checkpoint that cannot be read (a newer or unknown format, a damaged or
missing file, a missing key) raises Unreadable, naming the folder, what is wrong and what to do; it is never skipped
or deleted. Where checkpoints are kept, found and pruned is stages/lib/checkpointing/store.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from stages.lib.base.errors import UserError
from stages.lib.checkpointing import live_logs, rng
from stages.lib.distributed import full_state

if TYPE_CHECKING:  # torch is imported where tensors are handled, so finding checkpoints stays fast
    import torch

    from stages.lib.distributed.parallel import ParallelModel
    from stages.lib.distributed.world import World
    from stages.lib.modeling.precision import LossScaler

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
STATE_FILE = "state.json"
STATE_KEYS = ("step", "fingerprint", "fingerprint_values")  # what every state.json holds
SAFE_TORCH_LOAD = (2, 10)  # torch.load(weights_only=True) is safe from this version (GHSA-63cw-57p8-fm3p)


class Unreadable(UserError):
    """A checkpoint folder that cannot be used as it is; the message names it and says what to do."""

    def __init__(self, folder: Path, problem: str):
        super().__init__(f"{folder}: {problem}. It is left as it is: move it out of the way (or delete it if you "
                         "do not need it) to go on without it, or restore a good copy (`dvc checkout`, "
                         "`dvc pull`)")
        self.folder, self.problem = folder, problem


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
    scaler: LossScaler | None = None  # fp16's loss scaler (disabled in the other modes); None: not saved
    adapters: bool = False  # the model trains LoRA adapters on a frozen base: they are saved, not its weights

    @property
    def model_tensors(self) -> str:
        """What of the model a checkpoint holds: `weights` or `adapters`."""
        return "adapters" if self.adapters else "weights"


@dataclass(frozen=True)
class Part:
    """One named part of a checkpoint and how it travels.

    files: what it writes into the folder (checked to exist before a checkpoint is used; optional parts: none).
    capture(trainee): called on every process (it may gather); returns what rank 0 writes (None elsewhere).
    write(data, folder): rank 0 writes the captured data into the checkpoint folder being built.
    read(folder, version): rank 0 reads it back from a complete checkpoint of that format version.
    restore(trainee, data): called on every process (it may spread rank 0's data); `data` is None off rank 0.
    model_tensors: in checkpoints holding the model this way only (`weights` or `adapters`); None: in every one.
    """

    name: str
    files: tuple[str, ...]
    capture: Callable[[Trainee], Any]
    write: Callable[[Any, Path], None]
    read: Callable[[Path, int], Any]
    restore: Callable[[Trainee, Any], None]
    model_tensors: str | None = None


# ---- the parts ----------------------------------------------------------------------------------------------------

def _capture_weights(t: Trainee) -> tuple[dict, dict | None] | None:
    weights = full_state.gather_weights(t.parallel, t.world)
    return untie(weights, t.parallel.tied) if t.world.is_main else None


def _write_weights(captured: tuple[dict, dict | None], folder: Path) -> None:
    from safetensors.torch import save_file
    kept, metadata = captured
    save_file(kept, str(folder / "model.safetensors"), metadata=metadata)


def read_weights(folder: Path, version: int = FORMAT_VERSION) -> dict[str, torch.Tensor]:
    """A checkpoint's weights on the CPU (tied names stored once, see `retie`)."""
    from safetensors.torch import load_file
    return _reading(folder / "model.safetensors", load_file)


def _restore_weights(t: Trainee, weights: dict | None) -> None:
    full_state.spread_weights(t.parallel, t.world, retie(weights, t.parallel.tied) if t.world.is_main else None)


def _write_adapters(adapters: dict, folder: Path) -> None:
    from safetensors.torch import save_file
    save_file({name: tensor.contiguous() for name, tensor in adapters.items()}, str(folder / "adapters.safetensors"))


def read_adapters(folder: Path, version: int = FORMAT_VERSION) -> dict[str, torch.Tensor]:
    """A checkpoint's LoRA adapters on the CPU, by state-dict name."""
    from safetensors.torch import load_file
    return _reading(folder / "adapters.safetensors", load_file)


def _write_optimizer(state: dict, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    tensors, values, stored = {}, {}, set()
    for index, entries in state["state"].items():
        for name, value in _flattened(entries):
            if isinstance(value, torch.Tensor):
                tensor = value.contiguous()
                if tensor.numel() and tensor.untyped_storage().data_ptr() in stored:
                    tensor = tensor.clone()  # one tensor in many states (8-bit AdamW's quantization map): each its own
                stored.add(tensor.untyped_storage().data_ptr())
                tensors[f"{index}.{name}"] = tensor
            else:
                values[f"{index}.{name}"] = value
    save_file(tensors, str(folder / "optimizer.safetensors"))
    _write_json({"param_groups": state["param_groups"], "values": values}, folder / "optimizer.json")


def _read_optimizer(folder: Path, version: int) -> dict:
    if version == 1:
        return _read_pickled_optimizer(folder / "optimizer.pt")
    from safetensors.torch import load_file
    tensors = _reading(folder / "optimizer.safetensors", load_file)
    layout = _reading(folder / "optimizer.json", _read_json)
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *layout["values"].items()]:
        index, *outer, name = key.split(".")
        entries = state.setdefault(int(index), {})
        for level in outer:
            entries = entries.setdefault(level, {})
        entries[name] = value
    # JSON has no tuples: the betas of AdamW come back as lists, which its state dict holds as a tuple.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in layout["param_groups"]]
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _flattened(entries: dict, prefix: str = ""):
    """(dotted name, value) for each value of one parameter's optimizer state, nested dicts included."""
    for name, value in entries.items():
        if isinstance(value, dict):
            yield from _flattened(value, f"{prefix}{name}.")
        else:
            yield prefix + name, value


def _read_pickled_optimizer(path: Path) -> dict:
    """Format 1's optimizer.pt: the one pickle this project ever reads, once, to convert it."""
    import torch
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < SAFE_TORCH_LOAD:
        raise Unreadable(path.parent, f"its optimizer state is a pickle (format 1), which torch "
                         f"{torch.__version__} cannot read safely; upgrade torch to 2.10 or later to convert it")
    return _reading(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))


def _restore_optimizer(t: Trainee, state: dict | None) -> None:
    full_state.spread_optimizer(t.parallel, t.optimizer, t.world, state)


def _write_scaler(state: dict | None, folder: Path) -> None:
    if state is not None:
        _write_json(state, folder / "scaler.json")


def _read_scaler(folder: Path, version: int) -> dict | None:
    path = folder / "scaler.json"
    return _reading(path, _read_json) if path.exists() else None  # absent: saved without a loss scaler


def _restore_scaler(t: Trainee, state: dict | None) -> None:
    state = t.world.share(state)
    if state is not None and t.scaler is not None:
        t.scaler.load_state_dict(state)


def _write_rng(states: list, folder: Path) -> None:
    for rank, state in enumerate(states):
        _write_json(state, folder / rng.rank_file(rank), indent=None)


def _read_rng(folder: Path, version: int) -> list:
    return [_reading(folder / rng.rank_file(rank), _read_json) for rank in range(rng.saved_ranks(folder))]


def _restore_rng(t: Trainee, states: list | None) -> None:
    rng.set_rng_state(rng.state_for_rank(t.world.share(states), t.world.rank))


def _restore_logs(t: Trainee, snapshot: Path | None) -> None:
    # The workspace logs behind this checkpoint (restored older by `dvc exp run`): take the snapshot's instead.
    if t.world.is_main and snapshot is not None and live_logs.restore_logs(snapshot, t.live_dir):
        print(f"restored the logs up to this checkpoint into {t.live_dir}")


PARTS = (
    Part("weights", ("model.safetensors",), _capture_weights, _write_weights, read_weights, _restore_weights,
         model_tensors="weights"),
    Part("adapters", ("adapters.safetensors",),
         lambda t: full_state.gather_weights(t.parallel, t.world, trainable_only=True), _write_adapters,
         read_adapters, lambda t, data: full_state.spread_weights(t.parallel, t.world, data, partial=True),
         model_tensors="adapters"),
    Part("optimizer", ("optimizer.safetensors", "optimizer.json"),
         lambda t: full_state.gather_optimizer(t.parallel, t.optimizer, t.world), _write_optimizer, _read_optimizer,
         _restore_optimizer),
    Part("rng", (rng.RANK_0_FILE,), lambda t: t.world.gather(rng.rng_state()), _write_rng, _read_rng, _restore_rng),
    Part("scaler", (), lambda t: t.scaler.state_dict() if t.world.is_main and t.scaler else None,
         _write_scaler, _read_scaler, _restore_scaler),
    Part("logs", (), lambda t: t.live_dir if t.world.is_main else None,
         lambda live_dir, folder: live_logs.snapshot_logs(live_dir, folder / "live"),
         lambda folder, version: folder / "live" if (folder / "live").is_dir() else None, _restore_logs),
)
FORMAT_1_FILES = {"optimizer": ("optimizer.pt",)}  # files a part had in format 1, where they differ


# ---- writing, reading, restoring ----------------------------------------------------------------------------------

def parts_of(model_tensors: str) -> list[Part]:
    """The parts of a checkpoint that holds the model as `model_tensors` (`weights` or `adapters`)."""
    return [part for part in PARTS if part.model_tensors in (None, model_tensors)]


def model_tensors_of(state: dict) -> str:
    """What of the model the checkpoint of this state.json holds (`weights` before format 3)."""
    return state.get("model_tensors", "weights")


def capture(trainee: Trainee) -> dict | None:
    """Every part's data, on rank 0 (None elsewhere); every process must call it."""
    captured = {part.name: part.capture(trainee) for part in parts_of(trainee.model_tensors)}
    return captured if trainee.world.is_main else None


def write(folder: Path, captured: dict, state: dict) -> None:
    """Write a checkpoint into the empty folder `folder`; state.json last, which marks it complete."""
    model_tensors = "adapters" if "adapters" in captured else "weights"
    for part in parts_of(model_tensors):
        part.write(captured[part.name], folder)
    _write_json({"format_version": FORMAT_VERSION, **state, "model_tensors": model_tensors}, folder / STATE_FILE)


def restore(checkpoint: Checkpoint, trainee: Trainee) -> None:
    """Put every part of `checkpoint` back into the trainee; every process calls it, rank 0 alone reads."""
    version = checkpoint.state["format_version"]
    held = model_tensors_of(checkpoint.state)
    if held != trainee.model_tensors:  # the fingerprint tells LoRA runs apart: this is a bug, not a user's mistake
        raise RuntimeError(f"{checkpoint.path} holds {held}, but this session trains {trainee.model_tensors}")
    for part in parts_of(held):
        part.restore(trainee, part.read(checkpoint.path, version) if trainee.world.is_main else None)


def read_part(folder: Path, name: str) -> Any:
    """One part's data as rank 0 reads it from a complete checkpoint (e.g. "optimizer": its state dict)."""
    version = read_state(folder)["format_version"]
    return next(part for part in PARTS if part.name == name).read(Path(folder), version)


def read_state(folder: Path) -> dict:
    """The checkpoint's state.json, checked: its format can be read, it has the keys, its parts' files exist."""
    path = Path(folder) / STATE_FILE
    if not path.exists():
        raise Unreadable(folder, f"it has no {STATE_FILE}, so it is not a complete checkpoint (a complete one is "
                                 "only ever created whole)")
    state = _reading(path, _read_json)
    if not isinstance(state, dict):
        raise Unreadable(folder, f"{STATE_FILE} holds {type(state).__name__}, not an object")
    version = state.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise Unreadable(folder, f"{STATE_FILE} says format_version {version!r}, which this version of the code "
                                 f"cannot read (it reads {', '.join(map(str, READABLE_VERSIONS))})"
                                 + ("; it was written by a newer version: update the code" if newer else ""))
    for key in STATE_KEYS:
        if key not in state:
            raise Unreadable(folder, f"{STATE_FILE} has no '{key}'")
    for part in parts_of(model_tensors_of(state)):
        for name in (FORMAT_1_FILES.get(part.name, part.files) if version == 1 else part.files):
            if not (Path(folder) / name).is_file():
                raise Unreadable(folder, f"its {part.name} file {name} is missing")
            if name.endswith(".safetensors"):
                _check_safetensors(Path(folder) / name)
    return state


def _check_safetensors(path: Path) -> None:
    """A cheap check that a safetensors file is whole: its header parses and its tensors end within the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = f.read(length) if 0 < length <= size - 8 else b""
    try:
        tensors = json.loads(header.decode("utf-8"))
        end = max((t["data_offsets"][1] for k, t in tensors.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise Unreadable(path.parent, f"{path.name} is damaged (its header does not parse)") from None
    if 8 + length + end > size:
        raise Unreadable(path.parent, f"{path.name} is damaged (it is cut short: {size:,} bytes of "
                                      f"{8 + length + end:,})")


def _reading(path: Path, read: Callable[[Path], Any]) -> Any:
    """read(path), any failure of a damaged file turned into Unreadable naming it."""
    try:
        return read(path)
    except Exception as err:  # safetensors, json and torch raise many kinds; all mean a damaged file
        raise Unreadable(path.parent, f"{path.name} is damaged ({type(err).__name__}: {err})") from None


# ---- pieces -------------------------------------------------------------------------------------------------------

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


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(data: Any, path: Path, indent: int | None = 1) -> None:
    path.write_text(json.dumps(data, indent=indent, sort_keys=True) + "\n", encoding="utf-8")
