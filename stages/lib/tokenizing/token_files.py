"""Token files (docs/formats.md, "Token files"): writing them as a stream, reading them back for training.

The tokenize stage writes through `SplitWriter`; the train and evaluate stages read through `read_meta` and `read_split`
(`open_split`: the ids and mask alone). Format 2 added where each document starts (`<split>.docs.bin`) and, per split,
the facts about document lengths and prompts that the train stage's packing and the tokenize summary use.
"""

import hashlib
import heapq
import json
from pathlib import Path

import numpy as np

from stages.lib.base.errors import UserError
from stages.lib.base.files import write_atomically

FORMAT_VERSION = 2
SPLITS = ("train", "val")
# Token ids are stored little-endian whatever the machine, as the format says.
_ID_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_STARTS_DTYPE = np.dtype("<u8")
LONGEST_KEPT = 3  # longest documents named per split in meta.json
DOMINANT_SHARE = 0.10  # a document holding more of a split's tokens than this gets a warning


def token_dtype(vocab_size: int) -> str:
    """Name of the smallest id dtype that holds every id of a vocabulary of `vocab_size` (ids 0..vocab_size-1)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def id_dtype(name: str) -> np.dtype:
    """The numpy dtype (explicitly little-endian) for a dtype name from meta.json."""
    return _ID_DTYPES[name]


class SplitWriter:
    """Streams one split's documents into `<split>.bin`, `<split>.mask.bin`, `<split>.docs.bin` and/or `<split>.jsonl`.

    The hashes are always computed over the ids and the mask as the `.bin` files hold them, also when only JSONL
    is written, so the train stage can tell whether a checkpoint was trained on this exact token stream and loss
    mask (switching `train_on_prompt` changes only the mask).
    """

    def __init__(self, folder: Path, split: str, dtype: str, save_bin: bool, save_jsonl: bool):
        self.split = split
        self.dtype = id_dtype(dtype)
        self.documents = 0
        self.tokens = 0
        self.loss_tokens = 0
        self.with_prompt = 0
        self.without_loss = 0
        self.lengths = DocumentLengths()  # the length figures of the summary, in memory that does not grow
        self._sha = hashlib.sha256()
        self._mask_sha = hashlib.sha256()
        self._ids = open(folder / f"{split}.bin", "wb") if save_bin else None
        self._mask = open(folder / f"{split}.mask.bin", "wb") if save_bin else None
        self._starts = open(folder / f"{split}.docs.bin", "wb") if save_bin else None
        self._jsonl = open(folder / f"{split}.jsonl", "w", encoding="utf-8") if save_jsonl else None

    def write(self, ids: np.ndarray, mask: np.ndarray, doc_lengths: np.ndarray, with_prompt: int = 0,
              records: np.ndarray | None = None) -> None:
        """Append documents: `ids`/`mask` are their tokens back to back (EOS included), `doc_lengths` their sizes
        (each >= 1), `with_prompt` how many of them hold prompt text (instruction or chat). `records`: the record
        each document was made from, so that a record a mixture repeats (a source's weight above 1) is named once
        among the longest; by default each document is its own."""
        ids = ids.astype(self.dtype, copy=False)
        mask = mask.astype(np.uint8, copy=False)
        doc_lengths = np.asarray(doc_lengths, np.int64)
        starts = np.cumsum(doc_lengths) - doc_lengths
        data, mask_data = ids.tobytes(), mask.tobytes()
        self._sha.update(data)
        self._mask_sha.update(mask_data)
        if self._ids is not None:
            self._ids.write(data)
            self._mask.write(mask_data)
            self._starts.write((starts + self.tokens).astype(_STARTS_DTYPE).tobytes())
        if self._jsonl is not None:
            self._write_jsonl(ids, mask, doc_lengths)
        if len(doc_lengths):
            self.without_loss += int(np.count_nonzero(np.add.reduceat(mask, starts, dtype=np.int64) == 0))
        self.lengths.add(doc_lengths, self.documents, records)
        self.documents += len(doc_lengths)
        self.tokens += len(ids)
        self.loss_tokens += int(np.count_nonzero(mask))
        self.with_prompt += with_prompt

    def _write_jsonl(self, ids: np.ndarray, mask: np.ndarray, doc_lengths: np.ndarray) -> None:
        bounds = np.concatenate(([0], np.cumsum(doc_lengths)))
        id_lists, mask_lists = ids.tolist(), mask.tolist()
        lines = [json.dumps({"ids": id_lists[a:b], "mask": mask_lists[a:b]}, separators=(",", ":"))
                 for a, b in zip(bounds[:-1], bounds[1:])]
        self._jsonl.write("\n".join(lines) + "\n" if lines else "")

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        for f in (self._ids, self._mask, self._starts, self._jsonl):
            if f is not None:
                f.close()

    def summary(self) -> dict:
        """This split's entry for meta.json. `longest_documents` gives each one's index in the split; the tokenize
        stage adds where it came from."""
        return {"documents": self.documents, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "sha256": self._sha.hexdigest(), "mask_sha256": self._mask_sha.hexdigest(),
                "documents_with_prompt": self.with_prompt, "documents_without_loss": self.without_loss,
                "document_tokens": self.lengths.figures(),
                "longest_documents": [{"index": i, "tokens": n} for n, i, _ in self.lengths.longest]}


class DocumentLengths:
    """Document lengths as the summary needs them, in memory that does not grow with the number of documents: how
    many documents have each length (an exact median and 99th percentile: a split of n tokens has fewer than
    sqrt(2n) distinct lengths), and the longest few by a streaming top-k.

    The longest are ordered by length, ties by index (as a stable sort would), one per record.
    """

    def __init__(self, kept: int = LONGEST_KEPT):
        self.kept = kept
        self.counts: dict[int, int] = {}
        self.longest: list[tuple[int, int, int]] = []  # (tokens, index in the split, record), longest first

    def add(self, lengths: np.ndarray, first: int, records: np.ndarray | None = None) -> None:
        """Count documents `first`, `first` + 1, ... of lengths `lengths` (made from `records`)."""
        lengths = np.asarray(lengths, np.int64)
        for value, count in zip(*(a.tolist() for a in np.unique(lengths, return_counts=True))):
            self.counts[value] = self.counts.get(value, 0) + count
        floor = self.longest[-1][0] if len(self.longest) == self.kept else -1
        # Only documents longer than the shortest kept one can enter (a tie loses to the earlier document).
        candidates = np.flatnonzero(lengths > floor)
        if not len(candidates):
            return
        candidates = candidates[np.lexsort((candidates, -lengths[candidates]))]
        owners = candidates + first if records is None else np.asarray(records)[candidates]
        merged = heapq.merge(self.longest, zip(lengths[candidates].tolist(), (candidates + first).tolist(),
                                               owners.tolist()), key=lambda d: (-d[0], d[1]))
        kept, seen = [], set()
        for document in merged:
            if document[2] not in seen:
                seen.add(document[2])
                kept.append(document)
                if len(kept) == self.kept:
                    break
        self.longest = kept

    def figures(self) -> dict:
        """The median, 99th percentile (the higher neighbour) and longest length, as numpy computes them."""
        if not self.counts:
            return {"median": 0, "p99": 0, "max": 0}
        values = np.array(sorted(self.counts), np.int64)
        below = np.cumsum([self.counts[v] for v in values.tolist()])  # documents of each length or shorter
        n = int(below[-1])

        def kth(k: int) -> int:  # the k-th shortest (from 0)
            return int(values[np.searchsorted(below, k, side="right")])

        return {"median": int((kth((n - 1) // 2) + kth(n // 2)) / 2), "p99": kth(int(np.ceil(0.99 * (n - 1)))),
                "max": int(values[-1])}


def new_meta(vocab_size: int, eos_id: int, tokenizer_fingerprint: str, save_bin: bool, save_jsonl: bool) -> dict:
    """meta.json's contents before any split is written (`write_meta` adds them from each SplitWriter)."""
    return {"format_version": FORMAT_VERSION, "dtype": token_dtype(vocab_size), "vocab_size": vocab_size,
            "eos_id": eos_id, "tokenizer_fingerprint": tokenizer_fingerprint, "splits": {}, "bin": save_bin,
            "jsonl": save_jsonl}


def write_meta(folder: Path, meta: dict) -> None:
    """Write meta.json (last, once every split is written)."""
    write_atomically(Path(folder) / "meta.json", json.dumps(meta, indent=2) + "\n")


def read_meta(tokens_dir: str | Path) -> dict:
    """Read and check `meta.json` of a token folder."""
    path = Path(tokens_dir) / "meta.json"
    if not path.exists():
        raise UserError(f"{path} not found: run the tokenize stage first (dvc repro tokenize)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({err}); rerun the tokenize stage (dvc repro -f tokenize)") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        meta = meta if isinstance(meta, dict) else {}
        raise UserError(f"{path}: token files of format {meta.get('format_version')!r}, but this code reads format "
                        f"{FORMAT_VERSION} (which records where each document starts); rerun the tokenize stage "
                        "(dvc repro tokenize, or python -m stages.tokenize)")
    return meta


def packing_for(meta: dict, packing: str) -> str:
    """train.packing as it applies to these token files: `auto` is `documents` when the training split has documents
    with prompt text (instruction or chat data), `stream` for plain text."""
    if packing != "auto":
        return packing
    return "documents" if meta["splits"]["train"].get("documents_with_prompt", 0) > 0 else "stream"


def dominant_documents(meta: dict, split: str = "train") -> list[str]:
    """A warning for each document that holds more than DOMINANT_SHARE of a split's tokens (among 10 or more
    documents): one overlong record (a file whose line breaks were lost, a pasted log) silently becomes most of what
    the model learns."""
    s = meta["splits"].get(split, {})
    if s.get("documents", 0) < 10:
        return []
    return [f"warning: one {split} document of {d['tokens']:,} tokens ({d.get('source', 'index ' + str(d['index']))}) "
            f"is {d['tokens'] / s['tokens']:.0%} of the {split} tokens: the model will mostly learn that one "
            "document. Check that record (lost line breaks? a pasted log?), split it or drop it"
            for d in s["longest_documents"] if d["tokens"] > DOMINANT_SHARE * s["tokens"]]


def open_split(tokens_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of one split (see `read_split`)."""
    ids, mask, _ = read_split(tokens_dir, split)
    return ids, mask


def read_split(tokens_dir: str | Path, split: str,
               meta: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token ids, loss mask and where each document starts (int64 token indices, ascending, the first 0) of one
    split: memory-mapped `.bin` files, or arrays built from the JSONL, in one read. `meta`: the folder's meta.json as
    the caller already read it (read here otherwise)."""
    tokens_dir = Path(tokens_dir)
    meta = meta or read_meta(tokens_dir)
    if split not in meta["splits"]:
        raise UserError(f"{tokens_dir}/meta.json has no split '{split}'; it has {', '.join(meta['splits'])}")
    dtype = id_dtype(meta["dtype"])
    if meta["splits"][split]["tokens"] == 0:
        # numpy cannot memory-map an empty file.
        return np.zeros(0, dtype), np.zeros(0, np.uint8), np.zeros(0, np.int64)
    if meta["bin"]:
        ids = np.memmap(tokens_dir / f"{split}.bin", dtype=dtype, mode="r")
        mask = np.memmap(tokens_dir / f"{split}.mask.bin", dtype=np.uint8, mode="r")
        starts = np.fromfile(tokens_dir / f"{split}.docs.bin", dtype=_STARTS_DTYPE).astype(np.int64)
        return ids, mask, starts
    return _read_jsonl_split(tokens_dir / f"{split}.jsonl", dtype, meta["splits"][split]["tokens"])


def _read_jsonl_split(path: Path, dtype: np.dtype, tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.empty(tokens, dtype)
    mask = np.empty(tokens, np.uint8)
    starts = []
    at = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                doc = json.loads(line)
                n = len(doc["ids"])
                ids[at:at + n] = doc["ids"]
                mask[at:at + n] = doc["mask"]
                starts.append(at)
            except (ValueError, KeyError, TypeError, IndexError) as err:
                raise UserError(f"{path}:{number}: expected {{\"ids\": [...], \"mask\": [...]}} of equal length "
                                f"({type(err).__name__}: {err}); rerun the tokenize stage (dvc repro -f tokenize)"
                                ) from None
            at += n
    if at != tokens:
        raise UserError(f"{path} holds {at} tokens but meta.json says {tokens}; rerun the tokenize stage")
    return ids, mask, np.array(starts, np.int64)
