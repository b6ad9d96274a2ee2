"""Training on several processes: the launch through torchrun, the process group, DDP or FSDP, and the checkpoint
state gathered to rank 0 and spread from it.

- `train.devices` above 1 (or `auto` on a machine with several GPUs): `python -m stages.train` starts
  `python -m torch.distributed.run --standalone --nproc-per-node N -m stages.train` and waits for it, so `dvc repro`
  needs nothing else. Started under torchrun by hand (several nodes: torchrun's own rendezvous), the stage takes the
  world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) instead. One process per GPU with nccl; CPU
  processes with gloo.
- `train.strategy`: `ddp` keeps a whole model per process and averages gradients; `fsdp` (PyTorch's `fully_shard`)
  shards weights, gradients and optimizer state over the processes, gathering one transformer block at a time.
- Rank 0 alone chooses what to resume and reads that checkpoint, then sends its weights and optimizer state to the
  others; it alone writes checkpoints (gathered into the one-process format), logs and the export, while the others
  wait at a barrier. So a checkpoint resumes on any number of processes with either strategy.

Stopping: any process's SIGTERM/SIGINT stops every process after the same step (the flags are all-reduced before
each step; rank 0's clock decides `minutes_today`). Under the launcher, a signal to `python -m stages.train` is passed
to every worker (a second one, over a second later, stops them at once), and workers stop and save when the launcher disappears. torchrun
started by hand passes one signal on to the workers and kills them `--shutdown-timeout` seconds later (30 by
default): give it the time a checkpoint takes to save.
"""

import contextlib
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from stages import checkpoint as ckpt
from stages.errors import UserError
from stages.model import LossModule, transformer_blocks

LAUNCH_DIR_ENV = "STEPWISE_LAUNCH_DIR"  # set by the launcher: where workers leave their pids and the exit code
LAUNCHER_PID_ENV = "STEPWISE_LAUNCHER_PID"
EXIT_CODE_FILE = "exit-code"
# Long enough for rank 0 to gather and write a large checkpoint or export while the others wait at a barrier.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)
MODEL_PREFIX = "model."  # LossModule holds the model as its child `model`


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher speaking its environment) started this process."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def processes_to_start(devices: int | str, device: str) -> int:
    """How many training processes `train.devices` asks for on this machine (`auto`: one per visible GPU)."""
    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if devices == "auto":
        return max(1, gpus)
    if gpus and devices > gpus:
        raise UserError(f"train.devices = {devices}, but torch sees {gpus} GPU(s); set train.devices to at most "
                        f"{gpus} (or auto), or train.device: cpu to train in CPU processes")
    return devices


def pick_device(wanted: str, local_rank: int = 0) -> torch.device:
    """The device to train on: `auto` takes a GPU when there is one; process `local_rank` of a node takes GPU
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


@dataclass
class World:
    """This process's place among the training processes; one process alone is rank 0 of 1 (no process group)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    size: int = 1
    launched_here: bool = False  # started by `python -m stages.train` itself, which waits for the exit code
    launcher_pid: int | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that decides, reads and writes."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.size > 1:
            dist.barrier()

    def sum(self, value: float | torch.Tensor) -> float:
        """The sum over all processes of a number (or a one-element tensor)."""
        if self.size == 1:
            return float(value)
        total = torch.as_tensor(value, dtype=torch.float64).detach().to(self.device).reshape(1).clone()
        dist.all_reduce(total)
        return total.item()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over all processes of a tensor on this process's device (same dtype)."""
        if self.size == 1:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total)
        return total

    def max(self, values: list[float]) -> list[float]:
        """Element-wise maximum over all processes."""
        if self.size == 1:
            return list(values)
        most = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return most.tolist()

    def share(self, value: Any) -> Any:
        """Rank 0's JSON-ready `value`, on every process (sent as JSON bytes, never pickled)."""
        if self.size == 1:
            return value
        if self.is_main:
            data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(self.device)
            length = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        else:
            length = torch.zeros(1, dtype=torch.int64, device=self.device)
        dist.broadcast(length, src=0)
        if not self.is_main:
            data = torch.empty(int(length.item()), dtype=torch.uint8, device=self.device)
        dist.broadcast(data, src=0)
        return json.loads(data.cpu().numpy().tobytes().decode())

    def decide_on_main(self, decide: Callable[[], Any]) -> Any:
        """Run `decide` on rank 0 only and return its JSON-ready result everywhere; a UserError there is raised
        on every process (so none waits for an answer that never comes)."""
        if self.size == 1:
            return decide()
        answer = None
        if self.is_main:
            try:
                answer = {"value": decide()}
            except UserError as err:
                answer = {"error": str(err)}
        answer = self.share(answer)
        if "error" in answer:
            raise UserError(answer["error"])
        return answer["value"]

    def describe(self, strategy: str) -> str:
        """`cpu`, or `2 processes (ddp, gloo) on cpu`, for messages."""
        if self.size == 1:
            return str(self.device)
        return f"{self.size} processes ({strategy}, {dist.get_backend()}) on {self.device.type}"


@contextlib.contextmanager
def joined_world(wanted_device: str):
    """This process's World; under torchrun with several processes, a process group for the time of the block.

    On leaving normally every process waits for the others, so no worker exits (which torchrun could take for a
    failure and answer by killing the rest) while rank 0 still writes.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(wanted_device, local_rank if size > 1 else 0)
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if size == 1:
        yield World(device=device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    world = World(device=device, rank=dist.get_rank(), size=dist.get_world_size(),
                  launched_here=LAUNCH_DIR_ENV in os.environ, launcher_pid=int(launcher) if launcher else None)
    if world.launched_here:
        _register_worker(Path(os.environ[LAUNCH_DIR_ENV]), world.rank)
    try:
        yield world
        world.barrier()
    finally:
        dist.destroy_process_group()


def exit_code_to_report(code: int) -> int:
    """The code this worker exits with. Under the launcher rank 0 hands the session's code to it and every worker
    ends with 0, so torchrun reports no failure for a stop or a user error (the launcher exits with the code)."""
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if not launch_dir or "WORLD_SIZE" not in os.environ:
        return code
    if os.environ.get("RANK", "0") == "0":
        _write_atomically(Path(launch_dir) / EXIT_CODE_FILE, str(code))
    return 0


def launch(processes: int) -> int:
    """Run this stage in `processes` processes under torchrun on this machine; returns the session's exit code."""
    with tempfile.TemporaryDirectory(prefix="stepwise-launch-") as launch_dir:
        env = {**os.environ, LAUNCH_DIR_ENV: launch_dir, LAUNCHER_PID_ENV: str(os.getpid())}
        # torchrun would set 1 thread per process (with a warning); share the cores out instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "stages.train"]
        print(f"starting {processes} training processes: python {' '.join(command[1:])}", flush=True)
        # A session of its own: a Ctrl-C in the terminal reaches only this process, which passes it to the
        # workers once (torchrun would pass it on too, and a doubled signal means "stop at once").
        torchrun = subprocess.Popen(command, env=env, start_new_session=True)
        with _signals_passed_to_workers(torchrun, Path(launch_dir)):
            returncode = torchrun.wait()
        reported = Path(launch_dir) / EXIT_CODE_FILE
        if returncode == 0 and reported.exists():
            return int(reported.read_text())
        return returncode


@contextlib.contextmanager
def _signals_passed_to_workers(torchrun: subprocess.Popen, launch_dir: Path):
    def pass_on(signum, frame):
        pids = _worker_pids(launch_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not pids:  # the workers are still starting: torchrun stops them
            torchrun.send_signal(signum)
    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _register_worker(launch_dir: Path, rank: int) -> None:
    _write_atomically(launch_dir / f"rank-{rank}.pid", str(os.getpid()))


def _worker_pids(launch_dir: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted(launch_dir.glob("rank-*.pid"))]


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def launcher_gone(pid: int | None) -> bool:
    """Whether the launcher that started this worker has died (a killed `dvc repro`, say)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, though not ours to signal
        return False
    return False


@dataclass
class ParallelModel:
    """The model as the training loop drives it."""

    model: torch.nn.Module  # the HuggingFace model (under FSDP its parameters are shards)
    module: LossModule  # the model with its loss (under FSDP: sharded in place)
    forward: torch.nn.Module  # what forward passes go through: `module`, or DDP around it
    strategy: str  # single | ddp | fsdp
    tied: list = field(default_factory=list)  # groups of state-dict names that are one tensor

    def gradient_sync(self, last_micro_step: bool):
        """DDP all-reduces gradients only after the last micro-step. FSDP reduce-scatters after each one: skipping
        that would keep whole unsharded gradients between micro-steps, the memory FSDP is there to save."""
        if self.strategy == "ddp" and not last_micro_step:
            return self.forward.no_sync()
        return contextlib.nullcontext()


def parallel_model(model: torch.nn.Module, world: World, strategy: str, compile: bool = False) -> ParallelModel:
    """The model on this process's device: alone, replicated with DDP, or sharded with FSDP."""
    tied = ckpt.tied_names(model)
    if world.size == 1:
        module = LossModule(model.to(world.device), compile=compile)
        return ParallelModel(model, module, module, "single", tied)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = LossModule(model.to(world.device), compile=compile)
        wrapped = DDP(module, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                      gradient_as_bucket_view=True, **_no_buffer_sync(DDP))
        return ParallelModel(model, module, wrapped, "ddp", tied)
    return _sharded(model, world, compile, tied)


def _no_buffer_sync(ddp_class) -> dict:
    # The buffers (rotary frequencies) are constants: no broadcast before every forward. The keyword changed name.
    names = inspect.signature(ddp_class).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


def _sharded(model: torch.nn.Module, world: World, compile: bool, tied: list) -> ParallelModel:
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
    module = LossModule(model)  # the root unit: embeddings, final norm and head; fully_shard moves it to the device
    fully_shard(module, mesh=mesh)
    return ParallelModel(model, module, module, "fsdp", tied)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly sharded one (FSDP's gradient norm is a DTensor)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def gather_full_state(parallel: ParallelModel, optimizer: torch.optim.Optimizer,
                      world: World) -> tuple[dict, dict] | None:
    """On rank 0, the whole model's weights (its own names, tied ones included) and the optimizer state keyed as
    `optimizer.state_dict()` is on one process; None on the others. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(parallel.forward, options=options)
    optimizer_state = get_optimizer_state_dict(parallel.forward, optimizer, options=options)
    if not world.is_main:
        return None
    weights = {name.removeprefix(MODEL_PREFIX): tensor for name, tensor in weights.items()}
    return weights, _keyed_by_index(optimizer_state, _parameter_names(parallel, optimizer))


def spread_full_state(parallel: ParallelModel, optimizer: torch.optim.Optimizer, world: World,
                      weights: dict | None, optimizer_state: dict | None) -> None:
    """Put rank 0's weights and optimizer state (as `gather_full_state` returns them, tied names possibly stored
    once) into every process's model and optimizer; the others pass None."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    model_state, optim_state = {}, {}
    if world.is_main:
        model_state = {MODEL_PREFIX + name: t for name, t in ckpt.retie(weights, parallel.tied).items()}
        optim_state = _keyed_by_name(optimizer_state, _parameter_names(parallel, optimizer))
    set_model_state_dict(parallel.forward, model_state, options=options)
    set_optimizer_state_dict(parallel.forward, optimizer, optim_state, options=options)


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
