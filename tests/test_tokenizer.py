"""The tokenizer stage: a local HuggingFace folder, or a byte-level BPE trained on the rendered records."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tokenizer, text_records
from conftest import write_rendered as write_records
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from stages.lib.base.errors import UserError
from stages.lib.base.params import TokenizerParams
from stages.tokenizer import build_tokenizer

BPE = TokenizerParams(tokenizer_type="bpe", vocab_size=400, min_frequency=2)


def write_rendered(folder, texts, templates):
    """records.jsonl (one plain text segment per document) and stats.json, as the render stage writes them."""
    write_records(folder, text_records(texts), templates)
    return folder


def arithmetic(n=60):
    return [f"What is {i * 37 % 1000}+{i * 91 % 1000}? The answer is {i * 37 % 1000 + i * 91 % 1000}."
            for i in range(n)]


def chatml(n=60):
    return [f"<|im_start|>user\nWhat is {i}*{i + 3}?<|im_end|>\n<|im_start|>assistant\nIt is {i * (i + 3)}.<|im_end|>\n"
            for i in range(n)]


def folder_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_trained_bpe_reloads_with_autotokenizer(tmp_path):
    rendered = write_rendered(tmp_path / "rendered", arithmetic(), ["text"])
    build_tokenizer(BPE, rendered, tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == tok.eos_token
    assert tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert 256 < len(tok) <= 400
    assert not tok.chat_template and "<|im_start|>" not in tok.get_vocab()
    text = "What is 123+456? The answer is 579."
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # Digits are split one by one, so each digit of a number is its own token.
    assert [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)] == list("123456579")


def test_chat_data_gets_chatml_special_tokens_and_template(tmp_path):
    rendered = write_rendered(tmp_path / "rendered", chatml(), ["chatml"])
    build_tokenizer(BPE, rendered, tmp_path / "tokenizer")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens) | set(tok.added_tokens_encoder)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2*5?"},
                                    {"role": "assistant", "content": "It is 10."}], tokenize=False)
    assert text == "<|im_start|>user\nWhat is 2*5?<|im_end|>\n<|im_start|>assistant\nIt is 10.<|im_end|>\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids.count(start) == 2 and ids.count(end) == 2
    # The special tokens were cut out of the training text, so no merges were spent on their pieces.
    assert not any("im_" in t or "<|" in t for t in tok.get_vocab() if t not in tok.added_tokens_encoder)


def test_training_is_deterministic(tmp_path):
    rendered = write_rendered(tmp_path / "rendered", chatml() + arithmetic(), ["chatml", "alpaca"])
    build_tokenizer(BPE, rendered, tmp_path / "a")
    build_tokenizer(BPE, rendered, tmp_path / "b")
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")


def test_vocab_too_small_for_bytes_and_special_tokens(tmp_path):
    rendered = write_rendered(tmp_path / "rendered", chatml(), ["chatml"])
    with pytest.raises(UserError, match=r"tokenizer.vocab_size = 258 is too small.*259"):
        build_tokenizer(TokenizerParams(vocab_size=258), rendered, tmp_path / "tokenizer")
    build_tokenizer(TokenizerParams(vocab_size=259), rendered, tmp_path / "tokenizer")
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))) == 259


def test_bpe_needs_the_rendered_files(tmp_path):
    with pytest.raises(UserError, match="stats.json not found.*render"):
        build_tokenizer(BPE, tmp_path, tmp_path / "tokenizer")
    rendered = write_rendered(tmp_path / "rendered", [], [])
    with pytest.raises(UserError, match="no records"):
        build_tokenizer(BPE, rendered, tmp_path / "tokenizer")
    assert not (tmp_path / "tokenizer").exists()


def tiny_hf_folder(folder: Path, eos: str | None = "</s>") -> Path:
    """A small BPE tokenizer saved the way HuggingFace folders are: tokenizer.json + tokenizer_config.json."""
    save_tokenizer(folder, corpus=arithmetic(), specials=("</s>",), eos=eos)
    return folder


def hf(path) -> TokenizerParams:
    return TokenizerParams(tokenizer_type="huggingface", tokenizer_path=str(path))


def test_huggingface_folder_is_saved_for_the_next_stages(tmp_path):
    source = tiny_hf_folder(tmp_path / "source")
    build_tokenizer(hf(source), tmp_path / "rendered", tmp_path / "tokenizer")
    saved = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    original = Tokenizer.from_file(str(source / "tokenizer.json"))
    text = "What is 12+30? The answer is 42."
    assert saved.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False).ids
    assert saved.eos_token == "</s>" and saved.eos_token_id == original.token_to_id("</s>")
    assert (tmp_path / "tokenizer" / "tokenizer.json").exists()


def test_huggingface_errors_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="not a folder. Hub ids need network"):
        build_tokenizer(hf("gpt2"), tmp_path, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("nothing here")
    with pytest.raises(UserError, match="holds no tokenizer files.*README.md"):
        build_tokenizer(hf(tmp_path / "empty"), tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="no EOS token"):
        build_tokenizer(hf(tiny_hf_folder(tmp_path / "no_eos", eos=None)), tmp_path, tmp_path / "out")
    # ByT5's tokenizer is pure Python: it loads, but has no tokenizer.json for the tokenize stage.
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "tokenizer_config.json").write_text('{"tokenizer_class": "ByT5Tokenizer"}')
    with pytest.raises(UserError, match="slow .*ByT5Tokenizer without tokenizer.json"):
        build_tokenizer(hf(tmp_path / "slow"), tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stage_entry_point_reads_params(tmp_path):
    write_rendered(tmp_path / "data" / "rendered", chatml(), ["chatml"])
    (tmp_path / "params.yaml").write_text("tokenizer:\n  vocab_size: 270\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "stages.tokenizer"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(AutoTokenizer.from_pretrained(str(tmp_path / "data" / "tokenizer"))) == 270
    (tmp_path / "params.yaml").write_text("tokenizer:\n  vocab_size: 100\n")
    done = subprocess.run([sys.executable, "-m", "stages.tokenizer"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "tokenizer.vocab_size = 100 is too small" in done.stderr
    assert "Traceback" not in done.stderr


def old_form_merges(folder: Path) -> Path:
    """A tokenizer folder whose tokenizer.json writes one merge as a single string of three parts."""
    tiny_hf_folder(folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    merges[5] = " ".join(merges[5]) + " x" if isinstance(merges[5], list) else merges[5] + " x"
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def test_a_tokenizer_json_that_cannot_be_read_gets_a_message_saying_what_and_how_to_fix(tmp_path):
    folder = old_form_merges(tmp_path / "old")
    with pytest.raises(UserError) as caught:
        build_tokenizer(hf(folder), tmp_path, tmp_path / "out")
    message = str(caught.value)
    assert f"{folder / 'tokenizer.json'} cannot be read by the installed tokenizers" in message
    assert "merges are in an old form: merge 5 is" in message and "splits into 3 parts" in message
    assert "re-save the tokenizer with a current transformers" in message and "Traceback" not in message
    assert "PyMerges" not in message
    (folder / "tokenizer.model").write_bytes(b"sentencepiece model")
    with pytest.raises(UserError, match=r"remove or rename tokenizer\.json so that the model's other tokenizer "
                                        r"files \(tokenizer\.model\) are used"):
        build_tokenizer(hf(folder), tmp_path, tmp_path / "out")
    (folder / "tokenizer.json").write_text('{"model": {"merges": [')
    with pytest.raises(UserError, match=r"tokenizer\.json cannot be read.*not valid JSON.*damaged or cut off"):
        build_tokenizer(hf(folder), tmp_path, tmp_path / "out")


def test_the_render_stage_gives_the_same_message_for_a_chat_template(tmp_path, monkeypatch):
    from stages.lib.base.params import parse_params
    from stages.render import render

    folder = old_form_merges(tmp_path / "old")
    (tmp_path / "c.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    params = parse_params({"render": {"data_path": str(tmp_path / "c.jsonl")},
                           "tokenizer": {"tokenizer_type": "huggingface", "tokenizer_path": str(folder)}})
    with pytest.raises(UserError, match=r"tokenizer\.json cannot be read by the installed tokenizers.*old form"):
        render(params, tmp_path / "rendered")


def test_git_lfs_pointers_are_named(tmp_path):
    folder = tiny_hf_folder(tmp_path / "lfs")
    (folder / "tokenizer.json").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 9\n")
    with pytest.raises(UserError, match=r"tokenizer\.json hold Git LFS pointers.*git lfs pull"):
        build_tokenizer(hf(folder), tmp_path, tmp_path / "out")
