"""Every random generator's state (Python `random`, NumPy, torch's CPU and CUDA generators) as JSON-ready lists,
and back: the checkpoint's `rng` part, so a resumed session draws what an uninterrupted one would (dropout, a LoRA's
adapters' dropout, anything seeded once at the start)."""

import random


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
