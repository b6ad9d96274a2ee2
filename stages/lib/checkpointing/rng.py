"""Every random generator's state (Python `random`, NumPy, torch's CPU and CUDA generators) as JSON-ready lists,
and back: the checkpoint's `rng` part, so a resumed session draws what an uninterrupted one would (dropout, a LoRA's
adapters' dropout, anything seeded once at the start).

Each training process draws from generators of its own (rank 0 from the run's seed, rank r from seed + r, once the
model is built: a process's dropout masks are not another's), so each process's states are saved: `rng.json` holds
rank 0's (one process's, the format every checkpoint has), `rng-rank<r>.json` those of process r.
"""

import random
from pathlib import Path

RANK_0_FILE = "rng.json"


def rank_file(rank: int) -> str:
    """The file of process `rank`'s states in a checkpoint folder."""
    return RANK_0_FILE if rank == 0 else f"rng-rank{rank}.json"


def saved_ranks(folder: Path) -> int:
    """How many processes' states a checkpoint folder holds, rank 0 first and without gaps."""
    count = 0
    while (Path(folder) / rank_file(count)).is_file():
        count += 1
    return count


def state_for_rank(states: list, rank: int) -> dict:
    """Process `rank`'s states out of a checkpoint's; a process with none of its own (a checkpoint saved by fewer
    processes, or before each process saved its own) takes rank 0's, as every process did before."""
    return states[rank] if rank < len(states) else states[0]


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
