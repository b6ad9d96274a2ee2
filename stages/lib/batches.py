"""Training and validation batches from the token files: packed windows in a computed, resumable order.

A window is `seq_len + 1` consecutive tokens of a split's stream: window w starts at token `w * seq_len`, its first
`seq_len` tokens are the inputs and its last `seq_len` the targets; a target whose mask is 0 gets label -100 and
does not count in the loss. A split of n tokens has W = (n - 1) // seq_len windows.

Training order: sample i of the run reads window `perm_e[i % W]` of epoch `e = i // W`, where `perm_e` is a
permutation of range(W) seeded by (seed, e). Optimizer step s reads the samples
[s * G, (s + 1) * G) with G = batch_size * grad_accum * world_size (the global batch); micro-step m of rank r reads
the `batch_size` samples starting at `s * G + (m * world_size + r) * batch_size`. Everything is computed from
(seed, step), never replayed, so resuming at step 1,000,000 costs what resuming at step 10 does, and ranks of a
multi-process run read disjoint slices of the same global batch.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.lib.errors import UserError
from stages.lib.token_files import open_split

IGNORE_INDEX = -100  # the label that the loss skips (the HuggingFace convention)


class TokenWindows:
    """Windows of `seq_len + 1` tokens over one split (ids and loss mask, memory-mapped or in memory)."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, seq_len: int):
        self.ids, self.mask, self.seq_len = ids, mask, seq_len
        self.count = max(0, (len(ids) - 1) // seq_len)
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def gather(self, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels (both int64, batch x seq_len) of the given windows, in one fancy index per array."""
        index = np.asarray(windows, dtype=np.int64)[:, None] * self.seq_len + self._offsets
        tokens = self.ids[index].astype(np.int64)
        counts = self.mask[index[:, 1:]] != 0
        labels = np.where(counts, tokens[:, 1:], IGNORE_INDEX)
        return torch.from_numpy(tokens[:, :-1]), torch.from_numpy(labels)


def split_windows(tokens_dir: Path, split: str, seq_len: int, required: bool) -> TokenWindows | None:
    """The windows of one split of the token files; None (or, when `required`, an error) when there is none."""
    ids, mask = open_split(tokens_dir, split)
    windows = TokenWindows(ids, mask, seq_len)
    if windows.count == 0:
        if required:
            raise UserError(f"{tokens_dir}/{split}: {len(ids)} tokens are too few for one window of train.seq_len "
                            f"+ 1 = {seq_len + 1} tokens; lower train.seq_len or add training data")
        return None
    return windows


class WindowOrder:
    """Which window each training sample reads: one seeded permutation of the windows per epoch."""

    def __init__(self, windows_per_epoch: int, seed: int):
        self.windows_per_epoch, self.seed = windows_per_epoch, seed
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of one epoch; the two latest are kept, since a step can straddle an epoch boundary."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.windows_per_epoch)
        return self._perms[epoch]

    def windows(self, first_sample: int, count: int) -> np.ndarray:
        """Window ids of samples first_sample .. first_sample + count - 1 of the run."""
        samples = np.arange(first_sample, first_sample + count, dtype=np.int64)
        epochs, positions = np.divmod(samples, self.windows_per_epoch)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self.permutation(int(epoch))[positions[here]]
        return out


@dataclass
class DataCursor:
    """Where the run is in the data after `step` optimizer steps (saved in the checkpoint for people to read)."""

    samples_seen: int
    epoch: int
    position_in_epoch: int

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {"samples_seen": self.samples_seen, "epoch": self.epoch, "position_in_epoch": self.position_in_epoch}


class TrainBatches:
    """The micro-batches of each optimizer step, computed from the step number."""

    def __init__(self, windows: TokenWindows, seed: int, batch_size: int, grad_accum: int,
                 world_size: int = 1, rank: int = 0):
        self.windows, self.batch_size, self.grad_accum = windows, batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.order = WindowOrder(windows.count, seed)

    @property
    def samples_per_step(self) -> int:
        """The global batch: samples read by all ranks and micro-steps of one optimizer step."""
        return self.batch_size * self.grad_accum * self.world_size

    def micro_batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of micro-step `micro` of optimizer step `step`, for this rank."""
        first = step * self.samples_per_step + (micro * self.world_size + self.rank) * self.batch_size
        return self.windows.gather(self.order.windows(first, self.batch_size))

    def step_batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All micro-batches of optimizer step `step` for this rank."""
        return [self.micro_batch(step, micro) for micro in range(self.grad_accum)]

    def cursor(self, steps_done: int) -> DataCursor:
        """The data position once `steps_done` optimizer steps are done."""
        samples = steps_done * self.samples_per_step
        epoch, position = divmod(samples, self.windows.count)
        return DataCursor(samples, epoch, position)


def validation_batches(windows: TokenWindows, batch_size: int, n_batches: int) -> list[tuple[torch.Tensor, ...]]:
    """A fixed set of up to `n_batches` validation batches: windows spread evenly over the split, same every time."""
    wanted = min(windows.count, batch_size * n_batches)
    if wanted == 0:
        return []
    chosen = np.unique(np.linspace(0, windows.count - 1, wanted).round().astype(np.int64))
    return [windows.gather(chosen[at:at + batch_size]) for at in range(0, len(chosen), batch_size)]


def counted_tokens(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Targets that count in the loss across the given batches (known before any forward pass)."""
    return sum(int((labels != IGNORE_INDEX).sum()) for _, labels in batches)
