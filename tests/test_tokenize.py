"""The tokenize stage: rendered records -> token files, as docs/formats.md describes them."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import write_rendered
from tokenizers import Tokenizer, models, pre_tokenizers

from stages.lib.base.errors import UserError
from stages.lib.base.params import TokenizeParams
from stages.lib.tokenizing.records import parse_record
from stages.lib.tokenizing.token_files import open_split, read_meta, read_split, token_dtype
from stages.tokenize import load_tokenizer, response_token_mask, split_documents, tokenize_records
from stages.tokenizer import train_bpe

REPO = Path(__file__).resolve().parents[1]
PARAMS = TokenizeParams(val_ratio=0.0, shuffle=False, seed=1, save_bin=True, emit_jsonl=False,
                        train_on_prompt=False, chunk_mb=4.0)


def text_record(text):
    return {"source": "t.txt", "kind": "text", "segments": [{"text": text, "response": True}]}


def instruction_record(question, answer):
    prompt = f"Below is an instruction.\n\n### Instruction:\n{question}\n\n### Response:\n"
    return {"source": "i.json", "kind": "instruction",
            "segments": [{"text": prompt, "response": False}, {"text": answer, "response": True}]}


def chat_record(turns):
    segments = []
    for question, answer in turns:
        segments.append({"text": f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
                         "response": False})
        segments.append({"text": f"{answer}<|im_end|>", "response": True})
        segments.append({"text": "\n", "response": False})
    return {"source": "c.jsonl", "kind": "chat", "segments": segments}


def sample_records(n=40):
    """A mix of the three kinds, arithmetic like the sample data, with a few non-ASCII characters."""
    records = []
    for i in range(n):
        a, b = 3 * i + 1, 7 * i + 2
        if i % 3 == 0:
            records.append(text_record(f"{a} plus {b} makes {a + b}. Déjà vu, naïve café {i}."))
        elif i % 3 == 1:
            records.append(instruction_record(f"What is {a}+{b}?", f"{a}+{b} = {a + b}"))
        else:
            records.append(chat_record([(f"What is {a}*{b}?", f"It is {a * b}."), ("Thanks!", "You're welcome.")]))
    return records




def doc_text(record):
    return "".join(s["text"] for s in record["segments"])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Rendered sample records and a BPE tokenizer trained on them."""
    root = tmp_path_factory.mktemp("corpus")
    records = sample_records()
    path = write_rendered(root / "rendered", records)
    train_bpe(path, vocab_size=400, min_frequency=2, chat=True).save_pretrained(str(root / "tokenizer"))
    return root, path, records


def run(corpus, out, **changes):
    root, path, _ = corpus
    return tokenize_records(path, root / "tokenizer", out, replace(PARAMS, **changes))


def split_docs(ids, mask, eos_id):
    """(ids, mask) of each document, the trailing EOS dropped, checking each one ends with EOS."""
    ends = np.flatnonzero(ids == eos_id)
    assert len(ends) and ends[-1] == len(ids) - 1
    starts = np.concatenate(([0], ends[:-1] + 1))
    return [(ids[a:b], mask[a:b], mask[b]) for a, b in zip(starts, ends)]


def test_decoding_train_bin_gives_back_each_document(corpus, tmp_path):
    root, _, records = corpus
    meta = run(corpus, tmp_path / "tokens")
    ids, mask = open_split(tmp_path / "tokens", "train")
    backend = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    docs = split_docs(np.asarray(ids), np.asarray(mask), meta["eos_id"])
    assert len(docs) == len(records) == meta["splits"]["train"]["documents"]
    for (doc_ids, _, _), record in zip(docs, records):
        assert backend.decode(doc_ids.tolist(), skip_special_tokens=False) == doc_text(record)
    assert meta["splits"]["train"]["tokens"] == len(ids)
    assert meta["splits"]["val"] == {"documents": 0, "tokens": 0, "loss_tokens": 0,
                                     "sha256": hashlib.sha256(b"").hexdigest(),
                                     "mask_sha256": hashlib.sha256(b"").hexdigest(),
                                     "documents_with_prompt": 0, "documents_without_loss": 0,
                                     "document_tokens": {"median": 0, "p99": 0, "max": 0}, "longest_documents": [],
                                     "special_token_text": {"documents": 0, "first": []}}


def test_mask_covers_exactly_the_responses_and_their_eos(corpus, tmp_path):
    root, _, records = corpus
    meta = run(corpus, tmp_path / "tokens")
    ids, mask = open_split(tmp_path / "tokens", "train")
    backend = Tokenizer.from_file(str(root / "tokenizer" / "tokenizer.json"))
    for (doc_ids, doc_mask, eos_mask), record in zip(split_docs(ids, mask, meta["eos_id"]), records):
        response = "".join(s["text"] for s in record["segments"] if s["response"])
        prompt = "".join(s["text"] for s in record["segments"] if not s["response"])
        # The sample's segment boundaries fall between tokens, so the masked tokens spell the responses exactly.
        assert backend.decode(doc_ids[doc_mask == 1].tolist(), skip_special_tokens=False) == response
        assert backend.decode(doc_ids[doc_mask == 0].tolist(), skip_special_tokens=False) == prompt
        assert eos_mask == 1
        if record["kind"] == "text":
            assert doc_mask.all()
    assert meta["splits"]["train"]["loss_tokens"] == int(mask.sum()) < len(mask)


def test_train_on_prompt_counts_every_token(corpus, tmp_path):
    meta = run(corpus, tmp_path / "tokens", train_on_prompt=True)
    _, mask = open_split(tmp_path / "tokens", "train")
    assert mask.all() and meta["splits"]["train"]["loss_tokens"] == meta["splits"]["train"]["tokens"]


def test_plain_text_is_all_loss_and_prompt_only_documents_none(corpus, tmp_path):
    root, _, _ = corpus
    records = [text_record("12 plus 3 makes 15."),
               {"source": "x", "kind": "instruction", "segments": [{"text": "only a prompt", "response": False}]}]
    path = write_rendered(tmp_path / "rendered", records)
    tokenize_records(path, root / "tokenizer", tmp_path / "tokens", PARAMS)
    ids, mask = open_split(tmp_path / "tokens", "train")
    (_, text_mask, text_eos), (_, prompt_mask, prompt_eos) = split_docs(ids, mask, read_meta(tmp_path / "tokens")
                                                                         ["eos_id"])
    assert text_mask.all() and text_eos == 1
    assert not prompt_mask.any() and prompt_eos == 0


def test_an_empty_answer_still_teaches_ending_the_answer(corpus, tmp_path):
    root, _, _ = corpus
    records = [instruction_record("Say nothing.", ""), instruction_record("What is 1+1?", "2"),
               {"source": "p.jsonl:3", "kind": "instruction", "segments": [{"text": "a prompt", "response": False}]}]
    path = write_rendered(tmp_path / "rendered", records)
    meta = tokenize_records(path, root / "tokenizer", tmp_path / "tokens", PARAMS)
    ids, mask = open_split(tmp_path / "tokens", "train")
    (_, empty_mask, empty_eos), (_, answer_mask, answer_eos), (_, _, prompt_eos) = split_docs(ids, mask,
                                                                                             meta["eos_id"])
    assert not empty_mask.any() and empty_eos == 1  # the empty answer's EOS counts: the model learns to stop
    assert answer_mask.any() and answer_eos == 1
    assert prompt_eos == 0  # no answer segment at all: nothing to learn from it
    split = meta["splits"]["train"]
    assert split["documents_without_loss"] == 1 and split["documents_with_prompt"] == 3


def test_summary_names_the_longest_documents_and_warns_about_one_that_dominates(corpus, tmp_path, capsys):
    root, _, _ = corpus
    records = [text_record(f"{i} plus {i} makes {2 * i}.") for i in range(20)]
    records.insert(7, {**text_record(" ".join(["long line"] * 400)), "source": "raw/chat.jsonl:8"})
    records.append({"source": "p.jsonl:1", "kind": "instruction", "segments": [{"text": "hm", "response": False}]})
    path = write_rendered(tmp_path / "rendered", records)
    meta = tokenize_records(path, root / "tokenizer", tmp_path / "tokens", PARAMS)
    split = meta["splits"]["train"]
    longest = split["longest_documents"]
    assert longest[0]["source"] == "raw/chat.jsonl:8" and longest[0]["index"] == 7
    assert longest[0]["tokens"] == split["document_tokens"]["max"] > 10 * split["document_tokens"]["median"]
    assert [d["tokens"] for d in longest] == sorted((d["tokens"] for d in longest), reverse=True)
    out = capsys.readouterr().out
    assert "longest: " in out and "(raw/chat.jsonl:8, " in out
    assert "1 documents have no token in the loss" in out
    assert "warning: one train document" in out and "raw/chat.jsonl:8" in out.split("warning:")[1]
    tokenize_records(write_rendered(tmp_path / "even", records[:7] + records[8:]), root / "tokenizer",
                     tmp_path / "even-tokens", PARAMS)
    assert "warning" not in capsys.readouterr().out


def test_token_that_straddles_the_prompt_response_boundary_counts():
    # "Q: " | "yes" where the tokenizer merged " yes" into one token: that token is the answer's first token.
    text = "Q: yes. Ok"
    offsets = [(0, 1), (1, 2), (2, 6), (6, 7), (7, 10)]
    assert response_token_mask(offsets, [(3, 7)], len(text)).tolist() == [0, 0, 1, 1, 0]
    # A zero-width token (a SentencePiece-style prefix) takes the side of the character it sits on.
    assert response_token_mask([(0, 0), (0, 2), (3, 3), (3, 5)], [(3, 5)], 5).tolist() == [0, 0, 1, 1]


def test_parse_record_joins_segments_and_merges_neighbouring_responses():
    doc = parse_record(json.dumps({"segments": [{"text": "ab", "response": False}, {"text": "c", "response": True},
                                                {"text": "de", "response": True}, {"text": "", "response": True},
                                                {"text": "f", "response": False}, {"text": "g", "response": True}]}))
    assert doc.text == "abcdefg" and doc.response_spans == [(2, 5), (6, 7)]
    with pytest.raises(ValueError, match="segment"):
        parse_record('{"segments": [{"text": "a"}]}')


def test_dtype_is_chosen_from_the_vocabulary_size():
    assert token_dtype(1) == "uint16"
    assert token_dtype(65535) == "uint16"
    assert token_dtype(65536) == "uint16"  # ids 0..65535 all fit
    assert token_dtype(65537) == "uint32"
    assert token_dtype(200_000) == "uint32"


def test_a_vocabulary_past_65536_is_stored_as_uint32_without_wrapping(tmp_path):
    vocab = {f"w{i}": i for i in range(65536)}
    vocab["<eos>"] = 65536
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tokenizer").mkdir()
    tok.save(str(tmp_path / "tokenizer" / "tokenizer.json"))
    (tmp_path / "tokenizer" / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
    path = write_rendered(tmp_path / "rendered", [text_record("w65535 w3 w65534")])
    meta = tokenize_records(path, tmp_path / "tokenizer", tmp_path / "tokens", PARAMS)
    ids, _ = open_split(tmp_path / "tokens", "train")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 65537 and meta["eos_id"] == 65536
    assert ids.tolist() == [65535, 3, 65534, 65536]
    assert os.path.getsize(tmp_path / "tokens" / "train.bin") == 4 * 4


def test_same_seed_same_bytes_other_seed_other_order(corpus, tmp_path):
    params = dict(val_ratio=0.2, shuffle=True)
    run(corpus, tmp_path / "a", seed=7, **params)
    run(corpus, tmp_path / "b", seed=7, **params)
    run(corpus, tmp_path / "c", seed=8, **params)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["meta.json", "train.bin", "train.docs.bin", "train.mask.bin", "val.bin", "val.docs.bin",
                     "val.mask.bin"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.bin").read_bytes() != (tmp_path / "c" / "train.bin").read_bytes()
    # Another order of the same documents: together the two splits hold every document once.
    assert len(all_documents(tmp_path / "a")) == 40
    assert all_documents(tmp_path / "a") == all_documents(tmp_path / "c")


def all_documents(folder):
    """Every document's ids (EOS dropped) from both splits, sorted."""
    eos = read_meta(folder)["eos_id"]
    return sorted(tuple(doc[0].tolist()) for split in ("train", "val")
                  for doc in split_docs(*open_split(folder, split), eos))


def test_shuffled_order_follows_the_seed_and_keeps_every_document():
    train, val = split_documents(100, 0.1, True, seed=3)
    again, _ = split_documents(100, 0.1, True, seed=3)
    other, _ = split_documents(100, 0.1, True, seed=4)
    assert len(val) == 10 and sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    assert train.tolist() == again.tolist() and train.tolist() != other.tolist()
    train, val = split_documents(5, 0.1, False, seed=3)
    assert train.tolist() == [0, 1, 2, 3] and val.tolist() == [4]


def test_a_small_val_ratio_still_leaves_one_validation_document():
    assert [len(s) for s in split_documents(3, 0.01, True, 0)] == [2, 1]
    assert [len(s) for s in split_documents(2, 0.9, True, 0)] == [1, 1]
    assert [len(s) for s in split_documents(1, 0.0, True, 0)] == [1, 0]
    with pytest.raises(UserError, match="val_ratio"):
        split_documents(1, 0.05, True, 0)


def test_jsonl_holds_the_same_tokens_as_the_bin(corpus, tmp_path):
    both = run(corpus, tmp_path / "both", val_ratio=0.25, shuffle=True, emit_jsonl=True)
    only = run(corpus, tmp_path / "only", val_ratio=0.25, shuffle=True, save_bin=False)
    assert not (tmp_path / "only" / "train.bin").exists() and only["bin"] is False and only["jsonl"] is True
    assert both["splits"] == only["splits"]  # same counts and the same sha256 of the token stream
    for split in ("train", "val"):
        bin_ids, bin_mask = open_split(tmp_path / "both", split)
        lines = [json.loads(line) for line in open(tmp_path / "both" / f"{split}.jsonl", encoding="utf-8")]
        assert len(lines) == both["splits"][split]["documents"]
        assert sum((line["ids"] for line in lines), []) == bin_ids.tolist()
        assert sum((line["mask"] for line in lines), []) == bin_mask.tolist()
        jsonl_ids, jsonl_mask = open_split(tmp_path / "only", split)
        assert jsonl_ids.tolist() == bin_ids.tolist() and jsonl_mask.tolist() == bin_mask.tolist()
        starts = np.cumsum([0] + [len(line["ids"]) for line in lines])[:-1].tolist()
        assert read_split(tmp_path / "both", split)[2].tolist() == starts
        assert read_split(tmp_path / "only", split)[2].tolist() == starts
        assert both["splits"][split]["sha256"] == hashlib.sha256((tmp_path / "both" / f"{split}.bin")
                                                                 .read_bytes()).hexdigest()


def test_small_chunks_give_the_same_files_as_one_chunk(corpus, tmp_path):
    run(corpus, tmp_path / "one", val_ratio=0.1, shuffle=True)
    run(corpus, tmp_path / "many", val_ratio=0.1, shuffle=True, chunk_mb=1e-4)  # about one document per chunk
    for name in os.listdir(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()


def test_meta_describes_the_tokenizer(corpus, tmp_path):
    root, _, _ = corpus
    meta = run(corpus, tmp_path / "tokens")
    tokenizer_json = root / "tokenizer" / "tokenizer.json"
    backend = Tokenizer.from_file(str(tokenizer_json))
    assert meta["format_version"] == 2 and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == backend.get_vocab_size(with_added_tokens=True)
    assert meta["eos_id"] == backend.token_to_id("<|endoftext|>")
    assert meta["tokenizer_fingerprint"] == hashlib.sha256(tokenizer_json.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "tokens" / "meta.json").read_text()) == meta


def test_rerun_replaces_the_folder_whole(corpus, tmp_path):
    run(corpus, tmp_path / "tokens", emit_jsonl=True)
    run(corpus, tmp_path / "tokens")
    assert not (tmp_path / "tokens" / "train.jsonl").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_errors_name_the_file_and_line(corpus, tmp_path):
    root, _, records = corpus
    path = write_rendered(tmp_path / "rendered", records[:3])
    with open(path, "a", encoding="utf-8") as f:
        f.write('\n{"segments": "not a list"}\n')
    with pytest.raises(UserError, match=r"records\.jsonl, line 5: .*segments"):
        tokenize_records(path, root / "tokenizer", tmp_path / "tokens", PARAMS)
    assert not (tmp_path / "tokens").exists()
    empty = write_rendered(tmp_path / "empty", [])
    with pytest.raises(UserError, match="no records"):
        tokenize_records(empty, root / "tokenizer", tmp_path / "tokens", PARAMS)
    with pytest.raises(UserError, match="render stage"):
        tokenize_records(tmp_path / "missing.jsonl", root / "tokenizer", tmp_path / "tokens", PARAMS)
    with pytest.raises(UserError, match="tokenizer stage"):
        load_tokenizer(tmp_path / "no_tokenizer")


def test_stage_entry_point_reads_params_and_reports(corpus, tmp_path):
    root, _, records = corpus
    write_rendered(tmp_path / "data" / "rendered", records)
    shutil.copytree(root / "tokenizer", tmp_path / "data" / "tokenizer")
    (tmp_path / "params.yaml").write_text("tokenize:\n  val_ratio: 0.1\n  emit_jsonl: true\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.tokenize"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "train: 36 documents" in done.stdout and "val: 4 documents" in done.stdout
    assert "%|" not in done.stderr  # written to a file, not a terminal: no progress bar
    assert (tmp_path / "data" / "tokens" / "val.jsonl").exists()
    (tmp_path / "params.yaml").write_text("tokenize:\n  val_ratio: 0.1\n")
    (tmp_path / "data" / "rendered" / "records.jsonl").write_text("")
    done = subprocess.run([sys.executable, "-m", "stages.tokenize"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error:") and "Traceback" not in done.stderr


def test_index_records_finds_every_non_blank_line_across_read_blocks(tmp_path, monkeypatch):
    import stages.tokenize as stage

    content = b"abc\n\nde\nfghijklmnop\nq\n\n\nrs"
    (tmp_path / "r.jsonl").write_bytes(content)
    expected = [(0, 3), (5, 2), (8, 11), (20, 1), (24, 2)]
    for block in (7, 1 << 20):
        monkeypatch.setattr(stage, "_INDEX_BLOCK", block)
        starts, lengths = stage.index_records(tmp_path / "r.jsonl")
        assert list(zip(starts.tolist(), lengths.tolist())) == expected
