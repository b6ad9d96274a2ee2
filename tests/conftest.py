"""What the tests share: one way to build a tiny tokenizer, and the stage files written by the project's own writers
(rendered records, token files), so test inputs cannot drift from what the stages produce."""

import hashlib
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stages.lib.ingest.tally import Stats
from stages.lib.tokenizing.records import record_line
from stages.lib.tokenizing.token_files import SplitWriter, new_meta, write_meta

WORD_SPECIALS = ("<eos>", "<pad>")


def save_tokenizer(folder: Path, corpus: list[str] | None = None, words: list[str] | None = None,
                   specials: tuple[str, ...] = WORD_SPECIALS, eos: str | None = "<eos>", pad: str | None = None,
                   vocab_size: int = 300, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A tiny tokenizer saved as a HuggingFace folder; returns it.

    Word-level (the default): the specials get ids 0, 1, ..., then `words` (t2, t3, ... up to vocab_size when
    None); text is split on whitespace, an unknown word is the pad token. With a `corpus`: a byte-level BPE of
    `vocab_size` trained on it, the specials first.
    """
    if corpus is None:
        words = words if words is not None else [f"t{i}" for i in range(len(specials), vocab_size)]
        vocab = {token: i for i, token in enumerate([*specials, *words])}
        core = Tokenizer(models.WordLevel(vocab, unk_token=pad or specials[-1]))
        core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    else:
        core = Tokenizer(models.BPE())
        core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        core.decoder = decoders.ByteLevel()
        core.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    extra = [t for t in specials if t not in (eos, pad)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=pad,
                                        additional_special_tokens=extra, chat_template=chat_template)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def write_rendered(folder: Path, records: list[dict], templates=("alpaca", "chatml")) -> Path:
    """records.jsonl and stats.json as the render stage writes them; returns the records' path."""
    folder.mkdir(parents=True, exist_ok=True)
    stats = Stats(records_read=len(records), records_written=len(records), templates=set(templates),
                  characters=sum(len(s["text"]) for r in records for s in r["segments"]))
    with open(folder / "records.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(record_line(record.get("source", "x"), record.get("kind", "text"), record["segments"]))
    (folder / "stats.json").write_text(json.dumps(stats.as_json(), indent=2), encoding="utf-8")
    return folder / "records.jsonl"


def unmarked(segments: list[dict]) -> list[dict]:
    """Segments without their control marks (which characters the template wrote as special tokens), for tests
    about text and answers."""
    return [{k: v for k, v in s.items() if k != "control"} for s in segments]


def text_records(texts: list[str]) -> list[dict]:
    """Plain text records, one segment each, all of it counted in the loss."""
    return [{"source": f"t.txt:{i}", "kind": "text", "segments": [{"text": t, "response": True}]}
            for i, t in enumerate(texts)]


def write_token_files(folder: Path, splits: dict[str, list[tuple[np.ndarray, np.ndarray]]], vocab_size: int,
                      eos_id: int, tokenizer_json: Path | None = None, prompts: bool = False) -> dict:
    """Token files (meta.json, .bin, .mask.bin, .docs.bin) written by the tokenize stage's own writer; returns the
    meta.

    `splits`: split name -> documents, each (ids, mask) with its EOS included; `tokenizer_json`: the file whose
    sha256 the train stage compares with the tokenizer it loads; `prompts`: every document holds prompt text
    (instruction or chat data, which `train.packing: auto` packs as whole documents), else it is plain text.
    """
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = hashlib.sha256(tokenizer_json.read_bytes()).hexdigest() if tokenizer_json else "test"
    meta = new_meta(vocab_size, eos_id, fingerprint, save_bin=True, save_jsonl=False)
    for split, docs in splits.items():
        with SplitWriter(folder, split, meta["dtype"], save_bin=True, save_jsonl=False) as writer:
            if docs:
                writer.write(np.concatenate([ids for ids, _ in docs]), np.concatenate([m for _, m in docs]),
                             np.array([len(ids) for ids, _ in docs], np.int64), with_prompt=len(docs) if prompts else 0)
        meta["splits"][split] = writer.summary()
    write_meta(folder, meta)
    return meta
