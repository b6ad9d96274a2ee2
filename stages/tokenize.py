"""Tokenize stage: rendered records -> token files for training and validation (docs/formats.md).

Run it as `python -m stages.tokenize`; run as a script this file would shadow the standard library's `tokenize`.

Splits: the validation split is the render stage's validation source when it has one, else `tokenize.val_ratio`
of the documents drawn by `tokenize.seed`; then each source's training documents are repeated or subsampled by
its weight (stages/lib/tokenizing/mixture.py).

How it stays fast and bounded in memory:
- one pass notes where each record's line starts; documents are split and shuffled as indices and read back by
  offset, so memory holds two numbers per document, never the corpus;
- text is encoded about `tokenize.chunk_mb` at a time and the ids are written out before the next chunk is read;
  a byte-level BPE is run by tiktoken, which gives the same ids several times faster (stages/lib/tokenizing/encoders.py,
  `tokenize.encoder`), any other tokenizer by `encode_batch`, which spreads documents over the cores;
- character offsets (needed for the loss mask) are computed only for documents that mix prompt and response;
- a record larger than `tokenize.chunk_mb` is read and encoded in pieces (stages/lib/tokenizing/long_records.py),
  and the summary's figures are counted as the documents stream by, so memory grows only by the index above.

Special tokens come from the template only: text in a record that spells one is encoded as text, and counted and
located in meta.json (stages/lib/tokenizing/special_tokens.py).
"""

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tokenizers import Tokenizer

from stages.lib.base.errors import UserError, run_stage
from stages.lib.base.files import replaced_folder
from stages.lib.base.params import RENDERED_DIR, TOKENIZER_DIR, TOKENS_DIR, TokenizeParams, load_params
from stages.lib.base.progress import bar
from stages.lib.tokenizing import long_records
from stages.lib.tokenizing.encoders import encoder_for
from stages.lib.tokenizing.mixture import read_spans, validation_split, weighted
from stages.lib.tokenizing.pairs import PairWriter, has_pairs, pair_record, write_pair_meta_entry
from stages.lib.tokenizing.records import CONTROL_KEY, RECORDS_FILE, Document, as_document, parse_record, read_stats
from stages.lib.tokenizing.token_files import SplitWriter, dominant_documents, id_dtype, new_meta, write_meta

_INDEX_BLOCK = 16 << 20  # bytes read at a time while indexing lines
SPELLED_KEPT = 5  # documents that spell special tokens named per split in meta.json


@dataclass
class TokenizerInfo:
    """The `tokenizers` backend of the tokenizer folder, and what the token files record about it."""

    backend: Tokenizer
    eos_id: int
    vocab_size: int
    fingerprint: str
    encoder: Any  # stages/lib/tokenizing/encoders.py: TiktokenEncoder or TokenizersEncoder


def main() -> None:
    """Entry point of `python -m stages.tokenize`."""
    params = load_params()
    tokenize_records(RENDERED_DIR / RECORDS_FILE, TOKENIZER_DIR, TOKENS_DIR, params.tokenize)


def tokenize_records(records_path: Path, tokenizer_dir: Path, out_dir: Path, params: TokenizeParams) -> dict:
    """Encode every record into `out_dir` (meta.json, .bin/.mask.bin and/or .jsonl); return the meta."""
    records_path = Path(records_path)
    tok = load_tokenizer(Path(tokenizer_dir), params.encoder == "auto")
    print(f"tokenize: encoding with {tok.encoder.name}" + (" (the same ids as the tokenizers library, checked for this "
                                                          "tokenizer)" if tok.encoder.name == "tiktoken" else ""))
    starts, lengths = index_records(records_path)
    if len(starts) == 0:
        raise UserError(f"{records_path} holds no records: check render.data_path and rerun the render stage")
    splits = dict(zip(("train", "val"), plan_splits(read_spans(records_path.parent, len(starts)), params)))
    save_jsonl = params.emit_jsonl or not params.save_bin
    chunk_bytes = max(1, int(params.chunk_mb * (1 << 20)))
    meta = new_meta(tok.vocab_size, tok.eos_id, tok.fingerprint, params.save_bin, save_jsonl)
    dtype = meta["dtype"]
    total_bytes = sum(_bytes_of(lengths, order) for order in splits.values())
    with replaced_folder(out_dir) as folder, _Progress(total_bytes) as progress:
        for split, order in splits.items():
            spelling, done = SpecialTokenText(), 0
            with SplitWriter(folder, split, dtype, params.save_bin, save_jsonl) as writer:
                chunks = read_documents(records_path, starts, lengths, order, chunk_bytes)
                for docs, nbytes in prefetched(chunks):
                    if isinstance(docs, LongRecord):
                        spelled = write_long_record(tok, records_path, docs, writer, params.train_on_prompt,
                                                    int(order[done]), chunk_bytes)
                        spelling.add({int(order[done]): spelled} if spelled else {})
                        progress.advance(nbytes, 0)
                        done += 1
                        continue
                    ids, mask, doc_lengths, spelled = encode_documents(tok, docs, dtype, params.train_on_prompt)
                    writer.write(ids, mask, doc_lengths, with_prompt=sum(not doc.all_response() for doc in docs),
                                 records=order[done:done + len(docs)])
                    spelling.add({int(order[done + i]): tokens for i, tokens in spelled.items()})
                    progress.advance(nbytes, len(ids))
                    done += len(docs)
            meta["splits"][split] = writer.summary()
            meta["splits"][split]["special_token_text"] = spelling.summary(records_path, starts, lengths, chunk_bytes)
            for longest in meta["splits"][split]["longest_documents"]:
                record = order[longest["index"]]
                longest["source"] = record_source(records_path, int(starts[record]), int(lengths[record]), chunk_bytes)
        if has_pairs((read_stats(records_path.parent) or {}).get("formats", {})):
            write_pairs(records_path, starts, lengths, splits, tok, folder, meta)
        write_meta(folder, meta)
    print_summary(meta)
    return meta


class SpecialTokenText:
    """The documents of a split whose data spells a special token (encoded as text): counted, the first few named."""

    def __init__(self):
        self.documents = 0
        self.first: dict[int, list[str]] = {}  # record index -> the special tokens it spells

    def add(self, spelled: dict[int, list[str]]) -> None:
        """Count a chunk's documents that spell special tokens (record index -> the tokens)."""
        self.documents += len(spelled)
        for record, tokens in spelled.items():
            if len(self.first) < SPELLED_KEPT:
                self.first.setdefault(record, tokens)

    def summary(self, records_path: Path, starts: np.ndarray, lengths: np.ndarray, chunk_bytes: int) -> dict:
        """This split's entry for meta.json: how many documents, and where the first ones came from."""
        return {"documents": self.documents,
                "first": [{"source": record_source(records_path, int(starts[r]), int(lengths[r]), chunk_bytes),
                           "tokens": sorted(set(tokens))} for r, tokens in self.first.items()]}


def write_pairs(records_path: Path, starts: np.ndarray, lengths: np.ndarray, splits: dict, tok: TokenizerInfo,
                folder: Path, meta: dict, per_chunk: int = 1024) -> None:
    """Each split's preference pairs in their own token files (stages/lib/tokenizing/pairs.py), in the split's order.

    The prompt and each answer are encoded apart; an answer's mask comes from its response segments as an SFT
    document's does, and its EOS counts (ending the answer is part of it).
    """
    with open(records_path, "rb") as f:
        for split, order in splits.items():
            with PairWriter(folder, split, meta["dtype"]) as writer:
                for first in range(0, len(order), per_chunk):
                    picked = order[first:first + per_chunk]
                    lines = [os.pread(f.fileno(), int(lengths[i]), int(starts[i])) for i in picked]
                    pairs = [p for p in map(pair_record, lines) if p is not None]
                    prompts, chosen, rejected = (
                        encode_documents(tok, [as_document({"kind": "preference", "segments": p[k]}) for p in pairs],
                                         meta["dtype"], False)[:3] for k in ("prompt", "chosen", "rejected"))
                    for prompt, chosen, rejected in zip(*map(_per_document, (prompts, chosen, rejected))):
                        writer.write(prompt[0][:-1], chosen, rejected)  # the prompt without the EOS encoding adds
            write_pair_meta_entry(meta, split, writer.summary())


def _per_document(encoded: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, mask) of each document of an encode_documents result."""
    ids, mask, doc_lengths = encoded
    bounds = np.concatenate(([0], np.cumsum(doc_lengths)))
    return [(ids[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def record_source(path: Path, offset: int, length: int, chunk_bytes: int = 1 << 20) -> str:
    """Where the record at `offset` came from (its `source`, e.g. `data/raw/chat.jsonl:12`); a record larger than
    `chunk_bytes` is read without its long strings."""
    with open(path, "rb") as f:
        if length > chunk_bytes:
            source = json.loads(long_records.scan(f.fileno(), offset, length, chunk_bytes)[0]).get("source")
        else:
            source = json.loads(os.pread(f.fileno(), length, offset)).get("source")
    return source if isinstance(source, str) else f"{path}:{_line_number(path, offset)}"


def plan_splits(spans: list, params: TokenizeParams) -> tuple[np.ndarray, np.ndarray]:
    """Document indices of the train and val splits, in the order they are written (see the module docstring)."""
    held_out = validation_split(spans, params.shuffle, params.seed)
    if held_out is None:
        training = sum(s.records for s in spans)
        held_out = split_documents(training, params.val_ratio, params.shuffle, params.seed)
    elif params.val_ratio:
        print(f"tokenize: the validation split is the render stage's validation source; tokenize.val_ratio = "
              f"{params.val_ratio} is not used")
    train, val = held_out
    train = weighted(train, spans, params.shuffle, params.seed)
    if len(spans) > 1:
        print_mixture(spans, train)
    return train, val


def print_mixture(spans: list, train: np.ndarray) -> None:
    """One line per source: its documents and how many training documents it gave."""
    owner = np.repeat(np.arange(len(spans)), [s.records for s in spans])
    in_train = np.bincount(owner[train], minlength=len(spans))
    for i, span in enumerate(spans):
        role = "validation" if span.validation else f"weight {span.weight:g}, {in_train[i]:,} in training"
        print(f"tokenize: source {span.path}: {span.records:,} documents ({role})")


def load_tokenizer(folder: Path, allow_tiktoken: bool = True) -> TokenizerInfo:
    """Load `tokenizer.json` with the `tokenizers` library, find its EOS id and full vocabulary size, pick the encoder.

    `allow_tiktoken`: use tiktoken when it gives the same ids (tokenize.encoder: auto).
    """
    path = folder / "tokenizer.json"
    if not path.exists():
        raise UserError(f"{path} not found: run the tokenizer stage first (dvc repro tokenizer)")
    backend = Tokenizer.from_file(str(path))
    # A tokenizer.json may carry truncation or padding settings; either would silently change the documents.
    backend.no_truncation()
    backend.no_padding()
    eos = _eos_token(folder)
    eos_id = backend.token_to_id(eos)
    if eos_id is None:
        raise UserError(f"{folder}: the EOS token {eos!r} is not in tokenizer.json; rerun the tokenizer stage")
    # len(tokenizer) counts added tokens; ids may also have gaps, so the largest id bounds the vocabulary too.
    vocab = backend.get_vocab(with_added_tokens=True)
    vocab_size = max(backend.get_vocab_size(with_added_tokens=True), max(vocab.values()) + 1)
    fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()
    return TokenizerInfo(backend, eos_id, vocab_size, fingerprint, encoder_for(path, backend, eos, allow_tiktoken))


def _eos_token(folder: Path) -> str:
    """The EOS token's text, as HuggingFace's tokenizer_config.json (or special_tokens_map.json) names it."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists():
            eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and eos:
                return eos
    raise UserError(f"{folder} names no eos_token in tokenizer_config.json: every document must end with EOS; "
                    "rerun the tokenizer stage, or add \"eos_token\" to that file")


def index_records(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Byte offset and byte length (int64: one line may pass 2 GiB) of every non-blank line of `path`.

    Two streaming passes: one counts the lines, the other fills arrays of that size, so memory holds the two
    numbers per line and no copy of them (a gigabyte of short documents is millions of lines).
    """
    if not path.exists():
        raise UserError(f"{path} not found: run the render stage first (dvc repro render)")
    with open(path, "rb") as f:
        n_lines = sum(block.count(b"\n") for block in iter(lambda: f.read(_INDEX_BLOCK), b"")) + 1
    starts, lengths = np.empty(n_lines, np.int64), np.empty(n_lines, np.int64)
    kept, line_start, size = 0, 0, 0
    with open(path, "rb") as f:
        while block := f.read(_INDEX_BLOCK):
            ends = np.flatnonzero(np.frombuffer(block, np.uint8) == ord("\n")) + size
            line_starts = np.concatenate(([line_start], ends[:-1] + 1)) if len(ends) else ends
            kept = _keep_lines(starts, lengths, kept, line_starts, ends)
            line_start = int(ends[-1]) + 1 if len(ends) else line_start
            size += len(block)
    kept = _keep_lines(starts, lengths, kept, np.array([line_start]), np.array([size]))
    return starts[:kept], lengths[:kept]


def _keep_lines(starts: np.ndarray, lengths: np.ndarray, kept: int, line_starts: np.ndarray,
                ends: np.ndarray) -> int:
    """Append the non-empty lines [line_starts, ends) to the arrays after their first `kept`; return the new count."""
    size = ends - line_starts
    keep = size > 0
    n = int(keep.sum())
    starts[kept:kept + n] = line_starts[keep]
    lengths[kept:kept + n] = size[keep]
    return kept + n


def _bytes_of(lengths: np.ndarray, order: np.ndarray) -> int:
    """The bytes of the records `order` names, summed a million at a time (no array as long as `order`)."""
    return sum(int(lengths[order[i:i + (1 << 20)]].sum(dtype=np.int64)) for i in range(0, len(order), 1 << 20))


def split_documents(n_docs: int, val_ratio: float, shuffle: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Document indices of the train and val splits, in the order they are written.

    With `shuffle` the order is a permutation drawn from `seed` (the same seed, the same split and order). A
    positive `val_ratio` always leaves at least one validation and one training document.
    """
    n_val = 0
    if val_ratio > 0:
        if n_docs < 2:
            raise UserError(f"only {n_docs} document(s) to split, but tokenize.val_ratio = {val_ratio} needs at "
                            "least 2 (one for training, one for validation); add data or set val_ratio: 0")
        n_val = min(max(1, round(n_docs * val_ratio)), n_docs - 1)
    # int32 where it fits: half the memory for millions of documents. Shuffled in place, which draws the same
    # permutation as rng.permutation(n_docs) without its int64 array.
    order = np.arange(n_docs, dtype=np.int32 if n_docs < 1 << 31 else np.int64)
    if shuffle:
        np.random.default_rng(seed).shuffle(order)
    return order[:n_docs - n_val], order[n_docs - n_val:]


@dataclass
class LongRecord:
    """A record larger than tokenize.chunk_mb: read and encoded in pieces (stages/lib/tokenizing/long_records.py)."""

    offset: int
    length: int


def read_documents(path: Path, starts: np.ndarray, lengths: np.ndarray, order: np.ndarray,
                   chunk_bytes: int) -> Iterator[tuple[list[Document] | LongRecord, int]]:
    """Yield the documents `order` names, in that order, in chunks of about `chunk_bytes` of records; a record
    larger than that alone, as a LongRecord."""
    # pread, not mmap: mapped pages of the file would count in the memory of the process, which is to stay flat
    with open(path, "rb") as f:
        lines, offsets, nbytes = [], [], 0
        for first in range(0, len(order), 4096):
            picked = order[first:first + 4096]
            for start, length in zip(starts[picked].tolist(), lengths[picked].tolist()):
                if length > chunk_bytes:
                    if lines:
                        yield _parse_chunk(path, lines, offsets), nbytes
                        lines, offsets, nbytes = [], [], 0
                    yield LongRecord(start, length), length
                    continue
                lines.append(os.pread(f.fileno(), length, start))
                offsets.append(start)
                nbytes += length
                if nbytes >= chunk_bytes:
                    yield _parse_chunk(path, lines, offsets), nbytes
                    lines, offsets, nbytes = [], [], 0
        if lines:
            yield _parse_chunk(path, lines, offsets), nbytes


def _parse_chunk(path: Path, lines: list[bytes], offsets: list[int]) -> list[Document]:
    """The chunk's lines as Documents: parsed as one JSON array (one call costs far less than one per line)."""
    try:
        parsed = json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        parsed = []
    if len(parsed) != len(lines):  # a bad line: parse them one by one to name it
        return [_parse_at(path, line, offset) for line, offset in zip(lines, offsets)]
    try:
        return [as_document(record) for record in parsed]
    except ValueError:
        return [_parse_at(path, line, offset) for line, offset in zip(lines, offsets)]


def prefetched(items: Iterator) -> Iterator:
    """Yield from `items`, producing the next item in a background thread meanwhile.

    encode_batch releases the GIL, so reading and parsing the next chunk overlaps with encoding this one; on
    a many-core machine that parsing would otherwise be the bottleneck. One chunk ahead bounds the memory.
    """
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(next, items, None)
        while (item := pending.result()) is not None:
            pending = pool.submit(next, items, None)
            yield item


def _parse_at(path: Path, line: bytes, offset: int) -> Document:
    try:
        return parse_record(line)
    except ValueError as err:
        raise UserError(f"{path}, line {_line_number(path, offset)}: {err}; records are written by the render "
                        "stage (see docs/formats.md): rerun it") from None


def _line_number(path: Path, offset: int) -> int:
    # Only on the error path: counting newlines up to `offset` costs a read of the file's head.
    with open(path, "rb") as f:
        return f.read(offset).count(b"\n") + 1


def encode_documents(tok: TokenizerInfo, docs: list[Document], dtype: str,
                     train_on_prompt: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Token ids (each document followed by EOS), loss mask, tokens per document for a chunk of documents, and the
    special tokens spelled by the data of those that spell any (by index in `docs`: encoded as text)."""
    texts = [doc.text for doc in docs]
    partial = [] if train_on_prompt else [i for i, doc in enumerate(docs) if not doc.all_response()]
    encoded = tok.encoder.encode(texts, tok.eos_id, [i for i in partial if docs[i].response_spans],
                                 [doc.control for doc in docs])
    doc_lengths = encoded.lengths
    total = int(doc_lengths.sum())
    ids = encoded.ids.astype(id_dtype(dtype))
    mask = np.ones(total, np.uint8)
    ends = np.cumsum(doc_lengths)
    for i in partial:
        doc, start, end = docs[i], int(ends[i] - doc_lengths[i]), int(ends[i])
        if doc.response_spans:  # EOS stays 1: ending the answer is part of the answer
            mask[start:end - 1] = response_token_mask(encoded.offsets[i], doc.response_spans, len(doc.text))
        else:
            mask[start:end] = 0
    return ids, mask, doc_lengths, encoded.spelled


def write_long_record(tok: TokenizerInfo, path: Path, record: LongRecord, writer: SplitWriter,
                      train_on_prompt: bool, index: int, chunk_bytes: int) -> list[str]:
    """Encode a record larger than `chunk_bytes` piece by piece into `writer`, holding its tokens but never its
    text whole; return the special tokens its data spells."""
    with open(path, "rb") as f:
        try:
            skeleton, longs = long_records.scan(f.fileno(), record.offset, record.length, chunk_bytes)
            parsed = long_records.parse_skeleton(skeleton, longs)
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{path}, line {_line_number(path, record.offset)}: {err}; records are written by the "
                            "render stage (see docs/formats.md): rerun it") from None
        segments, spelled, exact = parsed["segments"], [], [True]
        responses = [s["response"] for s in segments]
        prompt = not all(responses)
        legacy = parsed.get("kind") == "chat" and not any(CONTROL_KEY in s for s in segments)

        def pieces() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            for piece in long_records.text_pieces(f.fileno(), segments, max(1, chunk_bytes // 2)):
                partial = prompt and not train_on_prompt
                encoded = tok.encoder.encode([piece.text], tok.eos_id, [0] if partial and any(responses) else [],
                                             None if legacy else [piece.control])
                n = len(encoded.ids) - 1  # the piece's tokens, its EOS left out
                mask = np.ones(n + piece.last, np.uint8)
                if partial and any(responses):
                    mask[:n] = response_token_mask(encoded.offsets[0], piece.response_spans, len(piece.text))
                elif partial:
                    mask[:] = 0
                spelled.extend(encoded.spelled.get(0, []))
                exact[0] &= piece.exact
                yield encoded.ids[:n + piece.last], mask

        writer.write_long_document(pieces(), with_prompt=prompt, record=index)
    note = ("" if exact[0] and tok.encoder.cuts_exact else ": the ids at each cut may differ from encoding it whole "
            "(this tokenizer's pre-tokenizer does not split at every space, or a stretch had no space to cut at)")
    source = parsed.get("source")
    source = source if isinstance(source, str) else f"{path}:{_line_number(path, record.offset)}"
    print(f"tokenize: {source}: a record of {record.length / (1 << 20):,.1f} MB, more than tokenize.chunk_mb, "
          f"encoded in pieces{note}")
    return sorted(set(spelled))


def response_token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], n_chars: int) -> np.ndarray:
    """1 for each token whose characters overlap a response span, from the tokens' character offsets.

    Overlap (not containment) is the rule because BPE may merge across a boundary, e.g. the space before an
    answer with its first word: that token is the answer's first token. A zero-width token (some tokenizers give
    added prefixes no width) is judged by the character at its position.
    """
    if len(offsets) == 0:
        return np.zeros(0, np.uint8)
    is_response = np.zeros(n_chars + 1, np.int64)
    for start, end in spans:
        is_response[start] += 1
        is_response[end] -= 1
    covered = np.concatenate(([0], np.cumsum(np.cumsum(is_response[:n_chars]) > 0)))
    bounds = np.asarray(offsets, np.int64).reshape(-1, 2)
    starts = np.minimum(bounds[:, 0], n_chars)
    ends = np.minimum(np.maximum(bounds[:, 1], starts + 1), n_chars)
    return (covered[ends] - covered[starts] > 0).astype(np.uint8)


class _Progress:
    """A tqdm bar over the records' bytes (so it shows MB/s), with tokens/s beside it."""

    def __init__(self, total_bytes: int):
        self.bar = bar(total=total_bytes, unit="B", unit_scale=True, desc="tokenize", mininterval=0.5)
        self.tokens = 0
        self.started = time.monotonic()

    def advance(self, nbytes: int, ntokens: int) -> None:
        """Count a chunk of records as done."""
        self.tokens += ntokens
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e3:,.0f}k tokens/s", refresh=False)
        self.bar.update(nbytes)

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


def print_summary(meta: dict) -> None:
    """Per split: documents, tokens, share of tokens in the loss, document lengths and the longest documents, the
    documents that teach nothing; then a warning for any document that is most of the training data."""
    for split, s in meta["splits"].items():
        per_doc = s["tokens"] / s["documents"] if s["documents"] else 0
        share = s["loss_tokens"] / s["tokens"] if s["tokens"] else 0
        print(f"tokenize: {split}: {s['documents']:,} documents, {s['tokens']:,} tokens ({per_doc:.1f} per document), "
              f"{share:.1%} of tokens in the loss")
        if not s["documents"]:
            continue
        lengths = s["document_tokens"]
        longest = ", ".join(f"{d['tokens']:,} ({d['source']}, {_share(d['tokens'] / s['tokens'])} of the tokens)"
                            for d in s["longest_documents"])
        print(f"tokenize: {split}: tokens per document: median {lengths['median']:,}, 99th percentile "
              f"{lengths['p99']:,}; longest: {longest}")
        if s["documents_without_loss"]:
            print(f"tokenize: {split}: {s['documents_without_loss']:,} documents have no token in the loss (a prompt "
                  "with no answer): they teach nothing")
        spelled = s.get("special_token_text", {})
        if spelled.get("documents"):
            where = ", ".join(f"{d['source']} ({' '.join(d['tokens'])})" for d in spelled["first"])
            print(f"tokenize: {split}: {spelled['documents']:,} documents spell a special token in their data, "
                  f"encoded as plain text (only the template writes special tokens): {where}")
    for split, pairs in (meta.get("pairs") or {}).items():
        print(f"tokenize: {split}: {pairs['pairs']:,} preference pairs, {pairs['tokens']:,} tokens "
              f"({split}.pairs.bin)")
    for warning in dominant_documents(meta):
        print(f"tokenize: {warning}")


def _share(share: float) -> str:
    return f"{share:.1%}" if share >= 0.001 else "<0.1%"


if __name__ == "__main__":
    run_stage(main)
