"""Token files for preference pairs, and the samples preference training reads from them (docs/formats.md).

The tokenize stage writes, beside each split's SFT token files, when the rendered records hold preference pairs:
- `<split>.pairs.bin`: each pair's prompt ids, then its chosen answer's ids and EOS, then its rejected answer's ids
  and EOS (the meta's dtype, little-endian);
- `<split>.pairs.mask.bin`: one uint8 per token, 1 where it counts in the loss (the answers' response tokens and
  their EOS, never the prompt);
- `<split>.pairs.index.bin`: four little-endian uint64 per pair: where it starts, and its prompt, chosen and
  rejected lengths;
and meta.json's `pairs` entry: per split the pairs, tokens and the hash of the ids and mask.

The prompt and each answer are encoded apart (TRL does the same), so the ids of the answer do not depend on how the
prompt ends. A sample is one pair: a batch of B pairs is 2B rows, the B chosen sequences (prompt + chosen answer)
and then the B rejected ones, each right-padded to train.seq_len. A pair longer than that is cut as TRL cuts by
default (`fit_pair`): the prompt loses tokens from its start, the answers from their end; the cuts are counted.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.lib.base.errors import UserError
from stages.lib.base.files import write_atomically
from stages.lib.tokenizing.batches import IGNORE_INDEX, Batch
from stages.lib.tokenizing.token_files import id_dtype, read_meta

_INDEX_DTYPE = np.dtype("<u8")


def has_pairs(record_kinds: dict) -> bool:
    """Whether the render stage read preference pairs (its stats.json `formats`: file -> kind)."""
    return "preference" in record_kinds.values()


class PairWriter:
    """Streams one split's pairs into its three pair files."""

    def __init__(self, folder: Path, split: str, dtype: str):
        self.dtype = id_dtype(dtype)
        self.pairs = self.tokens = self.loss_tokens = 0
        self._sha = hashlib.sha256()
        self._files = [open(Path(folder) / f"{split}.pairs{suffix}.bin", "wb") for suffix in ("", ".mask", ".index")]

    def write(self, prompt: np.ndarray, chosen: tuple[np.ndarray, np.ndarray],
              rejected: tuple[np.ndarray, np.ndarray]) -> None:
        """Append a pair: the prompt's ids, and each answer's (ids, mask), EOS included."""
        ids = np.concatenate([prompt, chosen[0], rejected[0]]).astype(self.dtype)
        mask = np.concatenate([np.zeros(len(prompt), np.uint8), chosen[1], rejected[1]]).astype(np.uint8)
        index = np.array([self.tokens, len(prompt), len(chosen[0]), len(rejected[0])], _INDEX_DTYPE)
        for f, data in zip(self._files, (ids, mask, index)):
            f.write(data.tobytes())
        self._sha.update(ids.tobytes())
        self._sha.update(mask.tobytes())
        self.pairs += 1
        self.tokens += len(ids)
        self.loss_tokens += int(mask.sum())

    def summary(self) -> dict:
        """This split's entry in meta.json's `pairs`."""
        return {"pairs": self.pairs, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "sha256": self._sha.hexdigest()}

    def __enter__(self) -> "PairWriter":
        return self

    def __exit__(self, *exc) -> None:
        for f in self._files:
            f.close()


@dataclass
class PairFiles:
    """One split's pairs as the files hold them."""

    ids: np.ndarray
    mask: np.ndarray
    index: np.ndarray  # (pairs, 4): start, prompt, chosen and rejected lengths

    def __len__(self) -> int:
        return len(self.index)

    def pair(self, i: int) -> tuple[np.ndarray, ...]:
        """(prompt ids, chosen ids, chosen mask, rejected ids, rejected mask) of pair i."""
        start, p, c, r = (int(v) for v in self.index[i])
        at = [start, start + p, start + p + c, start + p + c + r]
        return (self.ids[at[0]:at[1]], self.ids[at[1]:at[2]], self.mask[at[1]:at[2]], self.ids[at[2]:at[3]],
                self.mask[at[2]:at[3]])


def read_pairs(tokens_dir: str | Path, split: str) -> PairFiles | None:
    """The pairs of one split (memory-mapped), or None when the token files hold no pairs for it."""
    tokens_dir = Path(tokens_dir)
    meta = read_meta(tokens_dir)
    entry = (meta.get("pairs") or {}).get(split)
    if entry is None:
        return None
    dtype = id_dtype(meta["dtype"])
    if entry["pairs"] == 0:
        return PairFiles(np.zeros(0, dtype), np.zeros(0, np.uint8), np.zeros((0, 4), np.int64))
    ids = np.memmap(tokens_dir / f"{split}.pairs.bin", dtype=dtype, mode="r")
    mask = np.memmap(tokens_dir / f"{split}.pairs.mask.bin", dtype=np.uint8, mode="r")
    index = np.fromfile(tokens_dir / f"{split}.pairs.index.bin", dtype=_INDEX_DTYPE).astype(np.int64)
    if len(index) != entry["pairs"] * 4 or len(ids) != entry["tokens"]:
        raise UserError(f"{tokens_dir}: the pair files of split '{split}' do not match meta.json; rerun the tokenize "
                        "stage (dvc repro -f tokenize)")
    return PairFiles(ids, mask, index.reshape(-1, 4))


def fit_pair(prompt, chosen, rejected, limit: int) -> tuple:
    """(prompt tokens kept from its end, answer tokens kept from their start) so that prompt + answer <= limit, for
    one pair's lengths or for arrays of them (numpy arrays in, arrays out).

    Nothing is cut when both sequences fit. Otherwise the prompt keeps what the longer answer leaves, but at least
    half the limit when it is that long, and the answers keep the rest: TRL's default (the prompt's end and the
    answers' beginnings matter most).
    """
    longest = np.maximum(chosen, rejected)
    over = prompt + longest > limit
    kept = np.where(over, np.minimum(prompt, np.maximum(limit - longest, limit // 2)), prompt)
    answer = np.where(over, limit - kept, longest)
    return (kept, answer) if isinstance(kept, np.ndarray) and kept.ndim else (int(kept), int(answer))


class PreferencePairs:
    """Samples that are whole pairs, for train.objective dpo or orpo (the `Samples` interface of batches.py).

    `reference`: the reference model's log-probabilities of each pair's (chosen, rejected) answers (pairs x 2), when
    they were computed beforehand (train.reference: precomputed); they go into each batch.
    """

    def __init__(self, files: PairFiles, seq_len: int, reference: np.ndarray | None = None):
        self.files, self.seq_len, self.reference = files, seq_len, reference
        self.count = self.documents = len(files)
        lengths = files.index[:, 1:].astype(np.int64)
        prompt, limit = lengths[:, 0], seq_len + 1
        over = prompt + lengths[:, 1:].max(axis=1) > limit
        kept, answer = fit_pair(prompt, lengths[:, 1], lengths[:, 2], limit)
        inputs = 2 * kept + np.minimum(lengths[:, 1], answer) + np.minimum(lengths[:, 2], answer) - 2
        padding = 1 - inputs.sum() / (2 * self.count * seq_len) if self.count else 0.0
        self._facts = {"packing": "pairs", "samples": self.count, "padding_share": float(padding),
                       "documents_split": 0, "pairs_cut": int(over.sum()),
                       "prompts_cut": int((over & (kept < prompt)).sum())}

    def gather(self, samples: np.ndarray, epochs: np.ndarray | None = None) -> "PairBatch":
        """The batch of the given pairs: their chosen rows, then their rejected rows."""
        samples = np.asarray(samples, np.int64)
        rows = len(samples)
        inputs = np.zeros((2 * rows, self.seq_len), np.int64)
        labels = np.full((2 * rows, self.seq_len), IGNORE_INDEX, np.int64)
        for row, i in enumerate(samples.tolist()):
            prompt, chosen, chosen_mask, rejected, rejected_mask = self.files.pair(i)
            kept, answer = fit_pair(len(prompt), len(chosen), len(rejected), self.seq_len + 1)
            prompt = prompt[len(prompt) - kept:]
            for at, ids, mask in ((row, chosen, chosen_mask), (rows + row, rejected, rejected_mask)):
                tokens = np.concatenate([prompt, ids[:answer]]).astype(np.int64)
                counts = np.concatenate([np.zeros(kept, np.uint8), mask[:answer]])
                n = len(tokens) - 1
                inputs[at, :n] = tokens[:-1]
                labels[at, :n] = np.where(counts[1:] != 0, tokens[1:], IGNORE_INDEX)
        reference = None
        if self.reference is not None:
            picked = self.reference[samples]
            reference = torch.from_numpy(np.concatenate([picked[:, 0], picked[:, 1]]).astype(np.float64))
        return PairBatch(torch.from_numpy(inputs), torch.from_numpy(labels), None, reference)

    def documents_in(self, samples: np.ndarray, epochs: np.ndarray | None = None) -> np.ndarray:
        """One pair begins in each sample."""
        return np.ones(len(np.asarray(samples)), np.int64)

    def facts(self) -> dict:
        """What the log says about the samples."""
        return dict(self._facts)


@dataclass(frozen=True)
class PairBatch(Batch):
    """A batch of B pairs as 2B rows (the chosen sequences, then the rejected), with the reference model's
    log-probabilities of each row's answer when they were computed beforehand. The loss counts pairs, not tokens."""

    reference: torch.Tensor | None = None

    def counted(self) -> int:
        """Pairs in the batch (the preference losses are means over pairs)."""
        return len(self.inputs) // 2

    def to(self, device: torch.device) -> "PairBatch":
        """The batch on `device`."""
        moved = Batch.to(Batch(self.inputs, self.labels), device)
        reference = self.reference.to(device) if self.reference is not None else None
        return PairBatch(moved.inputs, moved.labels, None, reference)

    def arguments(self) -> tuple:
        """What the loss module's forward takes."""
        return self.inputs, self.labels, self.reference


def pair_samples(tokens_dir: Path, split: str, seq_len: int, required: bool,
                 reference: np.ndarray | None = None) -> PreferencePairs | None:
    """The pairs of one split as samples; None (or, when `required`, an error) when it has none."""
    files = read_pairs(tokens_dir, split)
    if files is None or len(files) == 0:
        if required:
            raise UserError(f"{tokens_dir}/meta.json holds no preference pairs for the '{split}' split, but "
                            "train.objective needs them: render pairs (records with chosen and rejected answers, "
                            "render.format: preference) and rerun the tokenize stage")
        return None
    return PreferencePairs(files, seq_len, reference)


def describe_pairs(facts: dict, seq_len: int) -> str:
    """One line for the train log: the pairs and how many train.seq_len cuts."""
    cut = (f"; {facts['pairs_cut']:,} longer than train.seq_len = {seq_len} are cut (answers from their end, "
           f"{facts['prompts_cut']:,} prompts from their start)") if facts["pairs_cut"] else ""
    return f"pairs: {facts['samples']:,} preference pairs, each batch row a prompt and one answer{cut}"


def write_pair_meta_entry(meta: dict, split: str, summary: dict) -> None:
    """Note a split's pairs in meta.json's contents."""
    meta.setdefault("pairs", {})[split] = summary


def pair_record(line: bytes | str) -> dict | None:
    """A records.jsonl line's pair ({"prompt", "chosen", "rejected"}), or None when it is not a pair."""
    record = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    return record if isinstance(record, dict) and record.get("kind") == "preference" else None


# ---- the reference model's scores (the reference stage writes them; DPO with train.reference: precomputed) ----

REFERENCE_META = "reference.json"
_SCORE_DTYPE = np.dtype("<f8")


def write_reference(folder: Path, scores: dict[str, np.ndarray], facts: dict) -> None:
    """Each split's scores (pairs x 2: chosen, rejected) as `<split>.logps.bin`, and what they were computed from."""
    folder = Path(folder)
    for split, values in scores.items():
        write_atomically(folder / f"{split}.logps.bin", np.asarray(values, _SCORE_DTYPE).tobytes())
    write_atomically(folder / REFERENCE_META, json.dumps(facts, indent=2) + "\n")


def read_reference(folder: Path, split: str, expected: dict) -> np.ndarray:
    """One split's reference scores (pairs x 2), checked against `expected` (the facts they must have been
    computed from: the pairs' hash, train.seq_len, the reference model)."""
    path = Path(folder) / REFERENCE_META
    rerun = "run the reference stage (dvc repro reference, or python -m stages.reference)"
    if not path.is_file():
        raise UserError(f"{path} not found: train.objective = dpo with train.reference = precomputed needs the "
                        f"reference model's scores of the pairs; {rerun}, or set train.reference: adapters_off "
                        "with LoRA")
    facts = json.loads(path.read_text(encoding="utf-8"))
    changed = [key for key, value in expected.items() if facts.get(key) != value]
    if changed:
        raise UserError(f"{path}: the reference scores were computed for other {', '.join(changed)} than this run's; "
                        f"{rerun}")
    return np.fromfile(Path(folder) / f"{split}.logps.bin", dtype=_SCORE_DTYPE).reshape(-1, 2)
