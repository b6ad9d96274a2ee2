"""Token files (docs/formats.md, "Token files"): writing them as a stream, reading them back for training.

The tokenize stage writes through `SplitWriter`; the train and evaluate stages read through `read_meta` and
`open_split`.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from stages.lib.errors import UserError
from stages.lib.files import write_atomically

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# Token ids are stored little-endian whatever the machine, as the format says.
_ID_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> str:
    """Name of the smallest id dtype that holds every id of a vocabulary of `vocab_size` (ids 0..vocab_size-1)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def id_dtype(name: str) -> np.dtype:
    """The numpy dtype (explicitly little-endian) for a dtype name from meta.json."""
    return _ID_DTYPES[name]


class SplitWriter:
    """Streams one split's documents into `<split>.bin`, `<split>.mask.bin` and/or `<split>.jsonl`.

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
        self._sha = hashlib.sha256()
        self._mask_sha = hashlib.sha256()
        self._ids = open(folder / f"{split}.bin", "wb") if save_bin else None
        self._mask = open(folder / f"{split}.mask.bin", "wb") if save_bin else None
        self._jsonl = open(folder / f"{split}.jsonl", "w", encoding="utf-8") if save_jsonl else None

    def write(self, ids: np.ndarray, mask: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents: `ids`/`mask` are their tokens back to back (EOS included), `doc_lengths` their sizes."""
        ids = ids.astype(self.dtype, copy=False)
        mask = mask.astype(np.uint8, copy=False)
        data, mask_data = ids.tobytes(), mask.tobytes()
        self._sha.update(data)
        self._mask_sha.update(mask_data)
        if self._ids is not None:
            self._ids.write(data)
            self._mask.write(mask_data)
        if self._jsonl is not None:
            self._write_jsonl(ids, mask, doc_lengths)
        self.documents += len(doc_lengths)
        self.tokens += len(ids)
        self.loss_tokens += int(np.count_nonzero(mask))

    def _write_jsonl(self, ids: np.ndarray, mask: np.ndarray, doc_lengths: np.ndarray) -> None:
        bounds = np.concatenate(([0], np.cumsum(doc_lengths)))
        id_lists, mask_lists = ids.tolist(), mask.tolist()
        lines = [json.dumps({"ids": id_lists[a:b], "mask": mask_lists[a:b]}, separators=(",", ":"))
                 for a, b in zip(bounds[:-1], bounds[1:])]
        self._jsonl.write("\n".join(lines) + "\n" if lines else "")

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc) -> None:
        for f in (self._ids, self._mask, self._jsonl):
            if f is not None:
                f.close()

    def summary(self) -> dict:
        """This split's entry for meta.json."""
        return {"documents": self.documents, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                "sha256": self._sha.hexdigest(), "mask_sha256": self._mask_sha.hexdigest()}


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
        raise UserError(f"{path}: format_version {meta.get('format_version')!r} is not the {FORMAT_VERSION} this "
                        "code reads; rerun the tokenize stage")
    return meta


def open_split(tokens_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and loss mask of one split: memory-mapped `.bin` files, or arrays built from the JSONL."""
    tokens_dir = Path(tokens_dir)
    meta = read_meta(tokens_dir)
    if split not in meta["splits"]:
        raise UserError(f"{tokens_dir}/meta.json has no split '{split}'; it has {', '.join(meta['splits'])}")
    dtype = id_dtype(meta["dtype"])
    if meta["splits"][split]["tokens"] == 0:
        # numpy cannot memory-map an empty file.
        return np.zeros(0, dtype), np.zeros(0, np.uint8)
    if meta["bin"]:
        ids = np.memmap(tokens_dir / f"{split}.bin", dtype=dtype, mode="r")
        mask = np.memmap(tokens_dir / f"{split}.mask.bin", dtype=np.uint8, mode="r")
        return ids, mask
    return _read_jsonl_split(tokens_dir / f"{split}.jsonl", dtype, meta["splits"][split]["tokens"])


def _read_jsonl_split(path: Path, dtype: np.dtype, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.empty(tokens, dtype)
    mask = np.empty(tokens, np.uint8)
    at = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                doc = json.loads(line)
                n = len(doc["ids"])
                ids[at:at + n] = doc["ids"]
                mask[at:at + n] = doc["mask"]
            except (ValueError, KeyError, TypeError, IndexError) as err:
                raise UserError(f"{path}:{number}: expected {{\"ids\": [...], \"mask\": [...]}} of equal length "
                                f"({type(err).__name__}: {err}); rerun the tokenize stage (dvc repro -f tokenize)"
                                ) from None
            at += n
    if at != tokens:
        raise UserError(f"{path} holds {at} tokens but meta.json says {tokens}; rerun the tokenize stage")
    return ids, mask
