"""The tiktoken encoder gives exactly the ids and offsets of the `tokenizers` library, for the byte-level BPE
shapes it takes on, and is refused for every other shape (or a vocabulary where the two would differ)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tokenizer, write_rendered
from test_tokenize import PARAMS, sample_records
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from stages.lib.tokenizing.encoders import TiktokenEncoder, TokenizersEncoder, byte_decoder, encoder_for
from stages.tokenize import tokenize_records
from stages.tokenizer import train_bpe

EOS = "<|endoftext|>"
# Llama 3's split pattern: contractions any case, letters with one leading non-letter, digits in threes, ...
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def varied_texts() -> list[str]:
    """Text of many kinds: prose, numbers, code, whitespace of every sort, scripts, emoji, random code points."""
    rng = np.random.default_rng(0)
    points = [c for c in rng.integers(0, 0x2FFFF, 6000).tolist() if not 0xD800 <= c < 0xE000]
    randoms = ["".join(map(chr, points[i:i + 120])) for i in range(0, len(points), 120)]
    return [
        "The quick brown fox jumps over the lazy dog. It's 12,345.67 o'clock; we'll see 2024-06-11!",
        "def f(x):\n    return x  * 2\t# tabs\tand  spaces   \n\n\n  trailing   ",
        "12 34  567   8901 1 2 3 x1y22z333 ٣٤٥ ²³ ½ Ⅻ", "a\u00a0b\u2003c\u3000d\u200be\u0085f\u2028g \r\n h",
        "日本語のテキストと中文文本，한국어 텍스트.", "emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷 é vs é (combining)",
        f"text with the EOS {EOS} inside it, and <|im_start|>user\nchat<|im_end|>\n", "", " ", "\n\n",
        *randoms]


def assert_same(encoder_dir: Path, texts: list[str]) -> None:
    """The folder's tokenizer gets the tiktoken encoder, whose ids, lengths and offsets equal tokenizers' own."""
    backend = Tokenizer.from_file(str(encoder_dir / "tokenizer.json"))
    fast = encoder_for(encoder_dir / "tokenizer.json", backend, EOS)
    assert isinstance(fast, TiktokenEncoder)
    slow, eos_id = TokenizersEncoder(backend), backend.token_to_id(EOS)
    everything = list(range(len(texts)))
    a, b = fast.encode(texts, eos_id, everything), slow.encode(texts, eos_id, everything)
    assert a.ids.tolist() == b.ids.tolist() and a.lengths.tolist() == b.lengths.tolist()
    for i in everything:
        assert np.asarray(a.offsets[i]).reshape(-1, 2).tolist() == [list(o) for o in b.offsets[i]], texts[i]


def bpe_folder(folder: Path, pre_tokenizer, corpus: list[str]) -> Path:
    """A byte-level BPE trained on `corpus`, with EOS and the ChatML tokens, saved as tokenizer.json."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizer
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=600, special_tokens=[EOS, "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    core.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return varied_texts() * 3 + ["".join(s["text"] for s in r["segments"]) for r in sample_records(60)]


def test_the_bpe_trained_here_digits_one_by_one(tmp_path, corpus):
    path = write_rendered(tmp_path / "rendered", [{"segments": [{"text": t, "response": True}]} for t in corpus])
    train_bpe(path, 600, 2, chat=True).save_pretrained(str(tmp_path / "tok"))
    assert_same(tmp_path / "tok", varied_texts())


def test_a_gpt2_style_byte_level_bpe(tmp_path, corpus):
    assert_same(bpe_folder(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=False), corpus), varied_texts())


def test_a_llama3_style_split_then_byte_level_bpe(tmp_path, corpus):
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert_same(bpe_folder(tmp_path, pre, corpus), varied_texts())


def edited(folder: Path, change) -> Path:
    data = json.loads((folder / "tokenizer.json").read_text())
    change(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("change", [
    lambda d: d.update(normalizer={"type": "NFC"}),
    lambda d: d["pre_tokenizer"].update(add_prefix_space=True),
    lambda d: d.update(post_processor={"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                       "use_regex": True}),
    lambda d: d["added_tokens"][1].update(lstrip=True),
    lambda d: d["model"].update(dropout=0.1),
], ids=["normalizer", "prefix-space", "trimmed-offsets", "lstrip", "dropout"])
def test_other_shapes_use_the_tokenizers_library(tmp_path, corpus, change):
    folder = bpe_folder(tmp_path, pre_tokenizers.ByteLevel(add_prefix_space=False), corpus[:50])
    assert isinstance(encoder_for(folder / "tokenizer.json", None, EOS), TiktokenEncoder)  # before the change
    assert isinstance(encoder_for(edited(folder, change), None, EOS), TokenizersEncoder)
    word_level = tmp_path / "word"
    save_tokenizer(word_level, eos=EOS, specials=(EOS, "<pad>"))
    assert isinstance(encoder_for(word_level / "tokenizer.json", None, EOS), TokenizersEncoder)


def test_a_token_that_is_not_its_own_bpe_is_refused_because_tiktoken_would_differ(tmp_path):
    # "abc" is made by merging "ab" + "c", but the BPE of "abc" merges "bc" first and ends as ["a", "bc"].
    chars = list(byte_decoder())
    vocab = {c: i for i, c in enumerate(chars)}
    for token in ("bc", "ab", "abc", EOS):
        vocab[token] = len(vocab)
    core = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.add_special_tokens([EOS])
    core.save(str(tmp_path / "tokenizer.json"))
    assert [t for t in core.encode("abc").tokens] == ["a", "bc"]
    assert isinstance(encoder_for(tmp_path / "tokenizer.json", core, EOS), TokenizersEncoder)
    import tiktoken  # what a tiktoken built without the check would say

    ranks = {bytes([b]): b for b in range(256)}
    for token in ("bc", "ab", "abc"):
        ranks[token.encode()] = len(ranks)
    naive = tiktoken.Encoding("naive", pat_str=r"\S+", mergeable_ranks=ranks, special_tokens={})
    assert naive.encode("abc") == [ranks[b"abc"]]


def test_the_tokenize_stage_writes_the_same_files_with_either_encoder(tmp_path):
    records = sample_records(60)
    path = write_rendered(tmp_path / "rendered", records)
    train_bpe(path, 400, 2, chat=True).save_pretrained(str(tmp_path / "tok"))
    params = replace(PARAMS, val_ratio=0.2, shuffle=True)
    tokenize_records(path, tmp_path / "tok", tmp_path / "fast", params)
    tokenize_records(path, tmp_path / "tok", tmp_path / "library", replace(params, encoder="tokenizers"))
    for name in ("meta.json", "train.bin", "train.mask.bin", "val.bin", "val.mask.bin"):
        assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "library" / name).read_bytes(), name
