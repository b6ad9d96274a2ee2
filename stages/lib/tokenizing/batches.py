"""Training and validation samples from the token files, and the resumable order in which training reads them.

A sample is `seq_len` input tokens and their labels (the next token, or -100 where it does not count: mask 0,
padding, the end of a document). `train.packing` decides how samples are cut (`packing_for` resolves `auto`):

- `stream` (nanoGPT's way, for plain text): a sample is a window of `seq_len + 1` consecutive tokens of the split,
  across document boundaries, every token attending to everything before it in the window. In training, window w of
  epoch e starts at token `offset_e + w * seq_len`, with `offset_e` in [0, seq_len) drawn from (seed, e): every
  epoch cuts the stream in new places, and has the same W = (n - seq_len) // seq_len windows. Validation windows
  start at offset 0 and cover the whole split, the last one padded.
- `documents` (instruction and chat data): every sample starts at the first token of a document and holds whole
  documents, attention stays inside each document and position ids restart at each one (see `Batch`). A document
  of n tokens makes n - 1 predictions; one of more than `seq_len` predictions is cut into pieces of `seq_len`
  (piece k reads tokens [k * seq_len, (k + 1) * seq_len] of it), each starting a sample of its own. Documents are
  placed in a seeded order (validation: the files' order) and each sample is filled with the next ones while they
  fit (next fit); the rest of it is padding, which never counts. Since no attention crosses documents, which
  documents share a sample changes nothing but which batch they fall in, so the packing is made once per run (from
  the seed, in one vectorised pass over the document lengths) and each epoch reads its samples in a new order.

Training order: sample i of the run is sample `perm_e[i % S]` of epoch `e = i // S`, where S is the samples per epoch
and `perm_e` a permutation of range(S) seeded by (seed, e). Optimizer step s reads the samples
[s * G, (s + 1) * G) with G = batch_size * grad_accum * world_size (the global batch); micro-step m of rank r reads
the `batch_size` samples starting at `s * G + (m * world_size + r) * batch_size`. Everything is computed from
(seed, step), never replayed, so resuming at step 1,000,000 costs what resuming at step 10 does, and ranks of a
multi-process run read disjoint slices of the same global batch.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.lib.base.errors import UserError
from stages.lib.tokenizing.token_files import read_split

IGNORE_INDEX = -100  # the label that the loss skips (the HuggingFace convention)
_OFFSETS, _PACKING = 1, 2  # tags that keep the random streams of epoch offsets and document order apart


@dataclass(frozen=True)
class Batch:
    """Inputs and labels (int64, batch x seq_len); `positions`: position ids restarting at 0 at each document, from
    which the model's attention builds its block-diagonal causal mask (None: one causal window per row)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor | None = None

    def counted(self) -> int:
        """Labels that count in the loss."""
        return int((self.labels != IGNORE_INDEX).sum())

    def arguments(self) -> tuple:
        """What the loss module's forward takes (a batch of preference pairs gives its own)."""
        return self.inputs, self.labels, self.positions

    def to(self, device: torch.device) -> "Batch":
        """The batch on `device`; from pinned host memory a GPU copy overlaps with the computation."""
        if device.type == "cuda":
            return Batch(*(t.pin_memory().to(device, non_blocking=True) if t is not None else None
                           for t in (self.inputs, self.labels, self.positions)))
        return Batch(*(t.to(device) if t is not None else None for t in (self.inputs, self.labels, self.positions)))


class StreamWindows:
    """Windows of `seq_len + 1` consecutive tokens over one split; `seed` None: validation windows (offset 0, the
    whole split, the last one padded), else training windows at a seeded offset per epoch."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, doc_starts: np.ndarray, seq_len: int,
                 seed: int | None = None):
        self.ids, self.mask, self.doc_starts, self.seq_len, self.seed = ids, mask, doc_starts, seq_len, seed
        self.documents = len(doc_starts)
        n = len(ids)
        self.count = max(0, (n - seq_len) // seq_len) if seed is not None else -(-max(0, n - 1) // seq_len)
        self._offsets = np.arange(seq_len + 1, dtype=np.int64)

    def first_tokens(self, samples: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """The first token of each window."""
        return np.asarray(samples, np.int64) * self.seq_len + self.offsets(epochs)

    def offsets(self, epochs: np.ndarray) -> np.ndarray:
        """The window offset of each epoch: seeded in training, 0 in validation."""
        epochs = np.asarray(epochs, np.int64)
        if self.seed is None:
            return np.zeros_like(epochs)
        unique, where = np.unique(epochs, return_inverse=True)
        drawn = [np.random.default_rng([self.seed, int(e), _OFFSETS]).integers(self.seq_len) for e in unique]
        return np.asarray(drawn, np.int64)[where]

    def gather(self, samples: np.ndarray, epochs: np.ndarray) -> Batch:
        """The batch of the given windows, in one fancy index per array; past the split's end, labels are -100."""
        index = self.first_tokens(samples, epochs)[:, None] + self._offsets
        inside = index < len(self.ids)
        index = np.minimum(index, len(self.ids) - 1)
        tokens = self.ids[index].astype(np.int64)
        counts = (self.mask[index[:, 1:]] != 0) & inside[:, 1:]
        labels = np.where(counts, tokens[:, 1:], IGNORE_INDEX)
        return Batch(torch.from_numpy(tokens[:, :-1]), torch.from_numpy(labels))

    def documents_in(self, samples: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """How many documents start within each window's inputs."""
        first = self.first_tokens(samples, epochs)
        return np.searchsorted(self.doc_starts, first + self.seq_len) - np.searchsorted(self.doc_starts, first)

    def facts(self) -> dict:
        """What the log says about the samples."""
        return {"packing": "stream", "samples": self.count, "padding_share": 0.0, "documents_split": 0}


class PackedDocuments:
    """Whole documents packed into samples of up to `seq_len` predictions (see the module docstring); `seed` None
    keeps the files' document order (validation)."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, doc_starts: np.ndarray, seq_len: int,
                 seed: int | None = None):
        self.ids, self.mask, self.seq_len = ids, mask, seq_len
        lengths = np.diff(np.append(doc_starts, len(ids)))
        predictions = lengths - 1
        kept = np.flatnonzero(predictions > 0)  # a lone EOS (an empty text) predicts nothing
        if seed is not None:
            kept = kept[np.random.default_rng([seed, 0, _PACKING]).permutation(len(kept))]
        pieces = -(-predictions[kept] // seq_len)
        doc = np.repeat(kept, pieces)
        piece = _ranges(np.zeros(len(pieces), np.int64), pieces)  # each piece's number within its document
        self.piece_start = doc_starts[doc] + piece * seq_len
        self.piece_size = np.minimum(seq_len, predictions[doc] - piece * seq_len)
        self.slot_end = np.cumsum(self.piece_size)  # where each piece ends in the packed sequence of all pieces
        self.first_piece = next_fit(self.piece_size, seq_len)  # sample j holds pieces first[j] .. first[j+1] - 1
        self.count = len(self.first_piece) - 1
        self.documents = len(kept)
        begins = (piece == 0).astype(np.int64)
        self._begun = np.add.reduceat(begins, self.first_piece[:-1]) if self.count else np.zeros(0, np.int64)
        long = pieces > 1
        self._facts = {"packing": "documents", "samples": self.count,
                       "padding_share": float(1 - self.slot_end[-1] / (self.count * seq_len)) if self.count else 0.0,
                       "documents_split": int(long.sum()),
                       "tokens_in_split_documents": int(lengths[kept][long].sum()),
                       "tokens": int(lengths.sum())}

    def gather(self, samples: np.ndarray, epochs: np.ndarray | None = None) -> Batch:
        """The batch of the given samples; padding has label -100 and positions of its own."""
        samples = np.asarray(samples, np.int64)
        first, last = self.first_piece[samples], self.first_piece[samples + 1]
        per_row = last - first
        pieces = _ranges(first, per_row)
        row = np.repeat(np.arange(len(samples)), per_row)
        sizes = self.piece_size[pieces]
        row_start = self.slot_end[first] - self.piece_size[first]  # slot of each row's first piece, run-wide
        slot_base = self.slot_end[pieces] - sizes - row_start[row]
        within = _ranges(np.zeros(len(pieces), np.int64), sizes)  # 0 .. size-1 in each piece
        piece_of_slot = np.repeat(np.arange(len(pieces)), sizes)
        token = self.piece_start[pieces][piece_of_slot] + within
        rows, slots = row[piece_of_slot], slot_base[piece_of_slot] + within
        shape = (len(samples), self.seq_len)
        inputs = np.zeros(shape, np.int64)
        labels = np.full(shape, IGNORE_INDEX, np.int64)
        # The padding after a row's documents counts its positions up from 0 too: a segment of its own, which
        # no document attends to.
        used = self.slot_end[last - 1] - row_start
        positions = np.arange(self.seq_len, dtype=np.int64)[None, :] - used[:, None]
        inputs[rows, slots] = self.ids[token]
        next_ids = self.ids[token + 1].astype(np.int64)
        labels[rows, slots] = np.where(self.mask[token + 1] != 0, next_ids, IGNORE_INDEX)
        positions[rows, slots] = within
        return Batch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(positions))

    def documents_in(self, samples: np.ndarray, epochs: np.ndarray | None = None) -> np.ndarray:
        """How many documents begin (their first piece) in each sample."""
        return self._begun[np.asarray(samples, np.int64)]

    def facts(self) -> dict:
        """What the log says about the packing."""
        return dict(self._facts)


def next_fit(sizes: np.ndarray, capacity: int) -> np.ndarray:
    """Boundaries of next-fit bins over `sizes` (each <= capacity) in their order: bin j holds items
    first[j] .. first[j+1] - 1, and an item opens a new bin when it does not fit in the current one.

    Next fit is sequential, one item after the other; computed here without a Python loop over the items. With C
    the cumulative sizes, the bin opened at item i ends before item f(i) = the last j with C[j] - C[i] <= capacity,
    so the bins open at 0, f(0), f(f(0)), ...: the m-th of those is f applied m times to 0, which doubling (f^2,
    f^4, ... from f) gives for every m at once in log2(n) vectorised rounds.
    """
    n = len(sizes)
    if n == 0:
        return np.zeros(1, np.int64)
    cumulative = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64)))
    jump = np.searchsorted(cumulative, cumulative + capacity, side="right") - 1  # f; f(n) = n
    m = np.arange(n + 1)
    first = np.zeros(n + 1, np.int64)
    bit = 1
    while bit <= n:
        chosen = (m & bit) != 0
        first[chosen] = jump[first[chosen]]
        jump = jump[jump]
        bit <<= 1
    return first[:np.searchsorted(first, n) + 1]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """starts[0] .. starts[0] + lengths[0] - 1, then the same for each following pair, concatenated."""
    total = int(lengths.sum())
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(np.asarray(starts, np.int64), lengths) + offsets


Samples = StreamWindows | PackedDocuments


def describe_samples(facts: dict, seq_len: int) -> str:
    """One line for the train log: how the training samples are cut, and what that costs."""
    if facts["packing"] == "stream":
        return (f"packing: stream: {facts['samples']:,} windows of {seq_len} tokens per epoch, cut at a new offset "
                "each epoch")
    split = ""
    if facts["documents_split"]:
        share = facts["tokens_in_split_documents"] / facts["tokens"]
        split = (f"; {facts['documents_split']:,} documents longer than train.seq_len = {seq_len} are cut into "
                 f"pieces ({share:.1%} of the tokens)")
    return (f"packing: documents: {facts['samples']:,} samples of up to {seq_len} tokens, "
            f"{facts['padding_share']:.1%} padding{split}")


def split_samples(tokens_dir: Path, split: str, seq_len: int, packing: str, seed: int | None,
                  required: bool, max_tokens: int = 0, meta: dict | None = None) -> Samples | None:
    """The samples of one split of the token files (`packing`: stream or documents; `seed` None for validation),
    of its first `max_tokens` tokens only when that is > 0; None (or, when `required`, an error) when there is none.
    `meta`: the token folder's meta.json, when the caller has read it."""
    ids, mask, starts = read_split(tokens_dir, split, meta)
    if max_tokens:
        ids, mask, starts = ids[:max_tokens], mask[:max_tokens], starts[starts < max_tokens]
    kind = PackedDocuments if packing == "documents" else StreamWindows
    samples = kind(ids, mask, starts, seq_len, seed)
    if samples.count == 0:
        if required:
            need = ("a document of 2 tokens or more" if packing == "documents" else
                    f"{2 * seq_len} tokens (two windows of train.seq_len = {seq_len}) to cut a window at any offset")
            raise UserError(f"{tokens_dir}/{split}: {len(ids)} tokens in {len(starts)} documents, but "
                            f"train.packing = {packing} needs {need}; lower train.seq_len or add training data")
        return None
    return samples


class SampleOrder:
    """Which sample each training sample of the run reads: one seeded permutation of the samples per epoch."""

    def __init__(self, samples_per_epoch: int, seed: int):
        self.samples_per_epoch, self.seed = samples_per_epoch, seed
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of one epoch; the two latest are kept, since a step can straddle an epoch boundary."""
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = rng.permutation(self.samples_per_epoch)
        return self._perms[epoch]

    def samples(self, first_sample: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ids and epochs of samples first_sample .. first_sample + count - 1 of the run."""
        run_samples = np.arange(first_sample, first_sample + count, dtype=np.int64)
        epochs, positions = np.divmod(run_samples, self.samples_per_epoch)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            out[here] = self.permutation(int(epoch))[positions[here]]
        return out, epochs


@dataclass
class DataCursor:
    """Where the run is in the data after `step` optimizer steps (saved in the checkpoint for people to read)."""

    samples_seen: int
    epoch: int
    position_in_epoch: int  # samples of this epoch already read
    documents_in_epoch: int  # documents begun in those samples
    documents_per_epoch: int  # documents in the split (every one of them is begun once per epoch in `documents`)

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return dict(vars(self))


class TrainBatches:
    """The micro-batches of each optimizer step, computed from the step number."""

    def __init__(self, samples: Samples, seed: int, batch_size: int, grad_accum: int, world_size: int = 1,
                 rank: int = 0):
        self.samples, self.batch_size, self.grad_accum = samples, batch_size, grad_accum
        self.world_size, self.rank = world_size, rank
        self.order = SampleOrder(samples.count, seed)

    @property
    def samples_per_step(self) -> int:
        """The global batch: samples read by all ranks and micro-steps of one optimizer step."""
        return self.batch_size * self.grad_accum * self.world_size

    def micro_batch(self, step: int, micro: int) -> Batch:
        """Micro-step `micro` of optimizer step `step`, for this rank."""
        first = step * self.samples_per_step + (micro * self.world_size + self.rank) * self.batch_size
        return self.samples.gather(*self.order.samples(first, self.batch_size))

    def step_batches(self, step: int) -> list[Batch]:
        """All micro-batches of optimizer step `step` for this rank."""
        return [self.micro_batch(step, micro) for micro in range(self.grad_accum)]

    def cursor(self, steps_done: int) -> DataCursor:
        """The data position once `steps_done` optimizer steps are done."""
        seen = steps_done * self.samples_per_step
        epoch, position = divmod(seen, self.samples.count)
        read = self.order.permutation(epoch)[:position]
        begun = int(self.samples.documents_in(read, np.full(len(read), epoch)).sum())
        return DataCursor(seen, epoch, position, begun, self.samples.documents)


def validation_batches(samples: Samples, count: int, batch_size: int) -> list[Batch]:
    """A fixed set of up to `count` validation samples spread evenly over the split, the same every time, cut into
    batches of `batch_size`: which samples does not depend on the batch size, so val/loss stays comparable between
    sessions that score them in batches of different sizes."""
    wanted = min(samples.count, count)
    if wanted == 0:
        return []
    chosen = np.unique(np.linspace(0, samples.count - 1, wanted).round().astype(np.int64))
    return [samples.gather(chosen[at:at + batch_size], np.zeros(len(chosen[at:at + batch_size]), np.int64))
            for at in range(0, len(chosen), batch_size)]


def counted_tokens(batches: list[Batch]) -> int:
    """Targets that count in the loss across the given batches (known before any forward pass)."""
    return sum(batch.counted() for batch in batches)
