"""The tokenize stage's memory does not grow with documents beyond the arrays it must hold: the length figures and
the longest documents are found streaming, and a record larger than tokenize.chunk_mb is encoded in pieces."""

import json
import os
from dataclasses import replace

import numpy as np
import pytest
from conftest import write_rendered
from test_tokenize import PARAMS, sample_records

from stages.lib.ingest.chat_templates import render_chat
from stages.lib.tokenizing.encoders import TiktokenEncoder, TokenizersEncoder
from stages.lib.tokenizing.token_files import DocumentLengths
from stages.tokenize import tokenize_records
from stages.tokenizer import train_bpe


def argsort_answer(lengths, records, kept=3):
    """What the summary computed before: a stable argsort of every document, one per record."""
    longest = np.argsort(-lengths, kind="stable")
    _, first = np.unique(records[longest], return_index=True)
    longest = longest[np.sort(first)][:kept]
    return [(int(lengths[i]), int(i), int(records[i])) for i in longest]


@pytest.mark.parametrize("seed", range(6))
def test_streaming_top_k_and_figures_equal_the_argsort_answer(seed):
    rng = np.random.default_rng(seed)
    n_records = int(rng.integers(1, 300))
    record_lengths = rng.integers(1, [5, 50, 10_000][seed % 3], n_records)  # many ties when the range is small
    records = np.concatenate([np.arange(n_records), rng.integers(0, n_records, n_records)])  # some repeated
    records = records[rng.permutation(len(records))]
    lengths = record_lengths[records]
    streamed = DocumentLengths()
    cuts = np.sort(rng.integers(0, len(lengths), 8))
    for a, b in zip([0, *cuts], [*cuts, len(lengths)]):
        streamed.add(lengths[a:b], a, records[a:b])
    assert streamed.longest == argsort_answer(lengths, records)
    assert streamed.figures() == {"median": int(np.median(lengths)),
                                  "p99": int(np.percentile(lengths, 99, method="higher")), "max": int(lengths.max())}


def test_lengths_past_int32_are_kept_exactly():
    streamed = DocumentLengths()
    streamed.add(np.array([3, 2**33 + 1, 5], np.int64), 0)
    assert streamed.longest[0] == (2**33 + 1, 1, 1) and streamed.figures()["max"] == 2**33 + 1


def long_text(rng, words=12_000):
    """Prose with paragraphs, runs of spaces, tabs, digits, accents, emoji, quotes and backslashes (JSON escapes)."""
    vocab = ["the", "cat", "sat", "déjà", "vu", "12345", "x=1;", "\"quoted\"", "back\\slash", "👍🏽", "日本語", "",
             "\t"]
    seps = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "   "]
    return "".join(vocab[i] + seps[j] for i, j in zip(rng.integers(0, len(vocab), words),
                                                      rng.integers(0, len(seps), words)))


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """Short records around a plain text record and a chat record each far larger than the chunk of the test."""
    root = tmp_path_factory.mktemp("long")
    rng = np.random.default_rng(0)
    chat = [{"role": "user", "content": long_text(rng, 6_000) + " <|im_end|> spelled"},
            {"role": "assistant", "content": long_text(rng, 6_000)},
            {"role": "user", "content": "and?"}, {"role": "assistant", "content": "done " + long_text(rng, 2_000)}]
    records = sample_records(20)
    records.insert(5, {"source": "book.txt:1", "kind": "text",
                       "segments": [{"text": long_text(rng), "response": True}]})
    records.insert(9, {"source": "chat.jsonl:1", "kind": "chat", "segments": render_chat(chat, "chatml")})
    path = write_rendered(root / "rendered", records)
    train_bpe(path, vocab_size=400, min_frequency=2, chat=True).save_pretrained(str(root / "tok"))
    return root, path


@pytest.mark.parametrize("encoder", ["auto", "tokenizers"])
def test_a_record_larger_than_chunk_mb_is_encoded_in_pieces_to_the_same_ids(long_corpus, tmp_path, encoder,
                                                                            monkeypatch):
    root, path = long_corpus
    params = replace(PARAMS, encoder=encoder, emit_jsonl=True)
    tokenize_records(path, root / "tok", tmp_path / "whole", replace(params, chunk_mb=64.0))
    largest = {"read": 0, "text": 0}
    encoder_class = TiktokenEncoder if encoder == "auto" else TokenizersEncoder
    pread, encode = os.pread, encoder_class.encode

    def watched_pread(fd, n, at):
        largest["read"] = max(largest["read"], n)
        return pread(fd, n, at)

    def watched_encode(self, texts, *args, **kwargs):
        largest["text"] = max([largest["text"], *map(len, texts)])
        return encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(os, "pread", watched_pread)
    monkeypatch.setattr(encoder_class, "encode", watched_encode)
    chunk_mb = 0.005
    meta = tokenize_records(path, root / "tok", tmp_path / "pieces", replace(params, chunk_mb=chunk_mb))
    for name in ("train.bin", "train.mask.bin", "train.docs.bin", "train.jsonl"):
        assert (tmp_path / "pieces" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    whole = json.loads((tmp_path / "whole" / "meta.json").read_text())
    assert meta["splits"] == whole["splits"]
    assert meta["splits"]["train"]["special_token_text"]["first"] == [{"source": "chat.jsonl:1",
                                                                       "tokens": ["<|im_end|>"]}]
    assert meta["splits"]["train"]["longest_documents"][0]["source"] in ("book.txt:1", "chat.jsonl:1")
    # Never held whole: no read and no text given to the encoder is near the size of the long records.
    record_bytes = max(len(line) for line in path.read_bytes().splitlines())
    assert record_bytes > 10 * chunk_mb * (1 << 20)
    chunk_bytes = chunk_mb * (1 << 20)  # a cut goes a few bytes further to keep an escape or a character whole
    assert largest["read"] <= chunk_bytes + 16 and largest["text"] <= chunk_bytes
