"""Weighted mixtures and a named validation source: render records each source once, tokenize holds validation
out and repeats or subsamples each source's training documents by its weight."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tokenizer
from test_render import in_tmp, write  # noqa: F401

from stages.lib.base.errors import UserError
from stages.lib.base.params import TokenizeParams, parse_params
from stages.lib.tokenizing.mixture import SourceSpan, weighted
from stages.lib.tokenizing.token_files import open_split, read_meta
from stages.render import render
from stages.tokenize import tokenize_records
from stages.tokenizer import train_bpe

WORDS = [f"t{i}" for i in range(2, 300)]


def paragraphs(first: int, n: int) -> str:
    """n documents of two words each, unique across calls with other `first`s."""
    return "".join(f"{WORDS[first + i]} {WORDS[first + i]}\n\n" for i in range(n))


def mixture(tokenize: dict | None = None, **render_keys) -> dict:
    """Render raw/ with render_keys, tokenize with a word-level tokenizer; return the token files' meta."""
    render(parse_params({"render": {"data_path": "raw", **render_keys}}), "rendered")
    save_tokenizer(Path("tok"))
    params = tokenize or {}
    return tokenize_records(Path("rendered/records.jsonl"), Path("tok"), Path("tokens"),
                            TokenizeParams(**{"val_ratio": 0.0, **params}))


def documents(split: str) -> list[tuple[int, ...]]:
    """The documents of a split as id tuples (EOS dropped)."""
    ids, _ = open_split("tokens", split)
    eos, docs, start = read_meta("tokens")["eos_id"], [], 0
    for end in np.flatnonzero(np.asarray(ids) == eos):
        docs.append(tuple(ids[start:end].tolist()))
        start = end + 1
    return docs


def test_weights_repeat_and_subsample_each_sources_documents():
    write("raw/a.txt", paragraphs(0, 10))
    write("raw/b.txt", paragraphs(100, 10))
    write("raw/c.txt", paragraphs(200, 4))
    sources = [{"path": "raw/a.txt", "weight": 2}, {"path": "raw/b.txt", "weight": 0.5},
               {"path": "raw/c.txt", "weight": 1.5}]
    meta = mixture(sources=sources)
    stats = json.loads(Path("rendered/stats.json").read_text())
    assert [(s["path"], s["weight"], s["records"]) for s in stats["sources"]] == [
        ("raw/a.txt", 2.0, 10), ("raw/b.txt", 0.5, 10), ("raw/c.txt", 1.5, 4)]
    assert meta["splits"]["train"]["documents"] == 20 + 5 + 6 and meta["splits"]["val"]["documents"] == 0
    train = documents("train")
    counts = {doc: train.count(doc) for doc in set(train)}
    first_word = {doc: doc[0] for doc in counts}
    from_a = [n for doc, n in counts.items() if first_word[doc] < 102]
    from_b = [n for doc, n in counts.items() if 102 <= first_word[doc] < 202]
    from_c = [n for doc, n in counts.items() if first_word[doc] >= 202]
    assert sorted(from_a) == [2] * 10 and sorted(from_b) == [1] * 5 and sorted(from_c) == [1, 1, 2, 2]


def test_a_record_the_weights_repeat_is_named_once_among_the_longest_documents():
    write("raw/a.txt", "".join(f"{' '.join(WORDS[:n])}\n\n" for n in (9, 7, 5, 3)))
    write("raw/b.txt", paragraphs(100, 4))
    meta = mixture(sources=[{"path": "raw/a.txt", "weight": 3}, {"path": "raw/b.txt"}])
    longest = meta["splits"]["train"]["longest_documents"]
    assert [d["source"] for d in longest] == ["raw/a.txt:1", "raw/a.txt:3", "raw/a.txt:5"]
    assert [d["tokens"] for d in longest] == [10, 8, 6]  # the words and EOS


def test_the_seeded_subset_follows_the_seed_and_the_split_is_drawn_before_weighting():
    spans = [SourceSpan("a", 1.0, False, 10), SourceSpan("b", 0.5, False, 10)]
    training = np.arange(20)
    once, again = weighted(training, spans, False, 3), weighted(training, spans, False, 3)
    other = weighted(training, spans, False, 4)
    assert once.tolist() == again.tolist() and once.tolist() != other.tolist()
    assert once[:10].tolist() == list(range(10)) and len(set(once[10:].tolist())) == 5
    unweighted = [SourceSpan("a", 1.0, False, 20)]
    assert weighted(training[::-1], unweighted, True, 3).tolist() == training[::-1].tolist()


def test_validation_ratio_documents_are_never_trained_on_even_when_weighted():
    write("raw/a.txt", paragraphs(0, 20))
    write("raw/b.txt", paragraphs(100, 20))
    meta = mixture(sources=[{"path": "raw/a.txt", "weight": 3}, {"path": "raw/b.txt"}],
                   tokenize={"val_ratio": 0.25})
    val, train = set(documents("val")), set(documents("train"))
    assert meta["splits"]["val"]["documents"] == 10 and not val & train
    assert meta["splits"]["train"]["documents"] == sum(3 if d[0] < 102 else 1 for d in train)


def test_a_validation_source_is_the_validation_split(capsys):
    write("raw/train/a.txt", paragraphs(0, 12))
    write("raw/train/held.txt", paragraphs(100, 3))
    meta = mixture(validation_path="raw/train/held.txt", data_path="raw/train", tokenize={"val_ratio": 0.1})
    stats = json.loads(Path("rendered/stats.json").read_text())
    assert [(s["path"], s["validation"], s["records"]) for s in stats["sources"]] == [
        ("raw/train", False, 12), ("raw/train/held.txt", True, 3)]
    assert documents("val") == [(WORDS.index(f"t{102 + i}") + 2,) * 2 for i in range(3)]
    assert meta["splits"]["train"]["documents"] == 12
    assert "tokenize.val_ratio = 0.1 is not used" in capsys.readouterr().out


def test_sources_must_be_inside_data_path_which_dvc_tracks():
    write("raw/a.txt", paragraphs(0, 3))
    write("elsewhere/b.txt", paragraphs(10, 3))
    with pytest.raises(UserError, match=r"render\.sources\[1\]\.path = 'elsewhere/b\.txt' is outside "
                                        r"render\.data_path = 'raw'"):
        mixture(sources=[{"path": "raw/a.txt"}, {"path": "elsewhere/b.txt"}])
    with pytest.raises(UserError, match=r"render\.validation_path = 'elsewhere/b\.txt' is outside"):
        mixture(validation_path="elsewhere/b.txt")
    with pytest.raises(UserError, match=r"render\.sources\[0\]\.path = 'raw/nope' does not exist"):
        mixture(sources=[{"path": "raw/nope"}])


def test_a_source_can_map_its_own_fields():
    write("raw/qa.jsonl", json.dumps({"q": "t5", "a": "t6"}) + "\n")
    write("raw/pc.jsonl", json.dumps({"prompt": "t7", "completion": "t8"}) + "\n")
    render(parse_params({"render": {"data_path": "raw", "sources": [
        {"path": "raw/qa.jsonl", "fields": {"instruction": "q", "output": "a"}},
        {"path": "raw/pc.jsonl", "fields": {"instruction": "prompt", "output": "completion"}}]}}), "rendered")
    lines = Path("rendered/records.jsonl").read_text().splitlines()
    assert [json.loads(line)["segments"][1]["text"] for line in lines] == ["t6", "t8"]


def test_the_tokenizer_is_trained_on_the_training_sources_only(tmp_path):
    write("raw/train.txt", "alphabet soup\n\n" * 40)
    write("raw/val.txt", "zulu quebec\n\n" * 40)
    render(parse_params({"render": {"data_path": "raw", "validation_path": "raw/val.txt"}}), "rendered")
    from stages.lib.base.params import TokenizerParams
    from stages.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(TokenizerParams(vocab_size=300, min_frequency=2), Path("rendered"), Path("tok"))
    vocab = tokenizer.get_vocab()
    assert "alphabet" in vocab and not any("zulu" in token for token in vocab)
    everything = train_bpe(Path("rendered/records.jsonl"), 300, 2, chat=False)
    assert any("zulu" in token for token in everything.get_vocab())
