"""The training processes as one world: this process's rank, the process group, and the few collectives the
session needs (sums, maxima, rank 0's JSON shared with everyone, everyone's JSON gathered on rank 0). One process
alone is rank 0 of a world of 1, where every collective is a no-op, so the session code is the same for one process
and many.

Processes join with nccl on GPUs (one per GPU) and gloo on CPUs. Nothing is ever pickled between processes: values
travel as JSON bytes.
"""

import contextlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from stages.lib.base.devices import pick_device
from stages.lib.base.errors import UserError
from stages.lib.distributed import launcher
from stages.lib.distributed.failures import FailureWatch

# Long enough for rank 0 to gather and write a large checkpoint or export while the others wait at a barrier.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass
class World:
    """This process's place among the training processes."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    size: int = 1
    launched_here: bool = False  # started by `python -m stages.train` itself, which waits for the exit code
    launcher_pid: int | None = None
    failures: FailureWatch | None = None  # another process's failure stops this one (failures.py)

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
        """Rank 0's JSON-ready `value`, on every process."""
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

    def gather(self, value: Any) -> list | None:
        """Every process's JSON-ready `value`, in rank order, on rank 0 (None elsewhere)."""
        if self.size == 1:
            return [value]
        data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(self.device)
        lengths = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.size)]
        dist.all_gather(lengths, torch.tensor([len(data)], dtype=torch.int64, device=self.device))
        longest = max(int(n.item()) for n in lengths)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[:len(data)] = data
        gathered = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(gathered, padded)
        if not self.is_main:
            return None
        return [json.loads(g[:int(n.item())].cpu().numpy().tobytes().decode()) for g, n in zip(gathered, lengths)]

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
    failure and answer by killing the rest) while rank 0 still writes. Until then a failure on any process stops
    them all (stages/lib/distributed/failures.py).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(wanted_device, local_rank if size > 1 else 0)
    if size == 1:
        yield World(device=device)
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    world = World(device=device, rank=dist.get_rank(), size=dist.get_world_size(),
                  launched_here=launcher.launched_here(), launcher_pid=launcher.launcher_pid())
    launcher.register_worker(world.rank)
    world.failures = FailureWatch.connect(world.rank)
    if world.failures:
        world.failures.start()
    try:
        yield world
        world.barrier()
    finally:
        if world.failures:
            world.failures.stop()
        dist.destroy_process_group()
