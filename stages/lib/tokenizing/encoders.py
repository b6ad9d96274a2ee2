"""Encoding documents for the tokenize stage: with the `tokenizers` library, or with tiktoken where it gives the
same ids, several times faster.

Both encoders turn a chunk of documents into one id array (each document's ids followed by EOS), the number of
tokens per document, and, for the documents asked for, each token's character offsets as `tokenizers` gives them.

tiktoken runs a byte-level BPE by the rank of each token (merge the adjacent pair whose joined bytes rank lowest),
`tokenizers` by the rank of each merge (merge the adjacent pair listed first in `merges`). With the ranks taken
from the merges' order the two agree on every input provided that the BPE of each token's own bytes is that one
token, because a pair that is not a listed merge can then never become adjacent while its joined bytes are a
token (the pieces of a token's bytes evolve exactly as they do when the token's bytes are encoded alone). So the
tiktoken encoder is built only for a tokenizer.json of a shape whose every step tiktoken reproduces, and only
after that check passes for every token:
- no normalizer; a ByteLevel pre-tokenizer with GPT-2's split pattern (optionally after splitting digits one by
  one, as the BPE trained here does) or a Split by a regex followed by a ByteLevel without one (Llama 3 style);
- a BPE model over the 256 byte tokens, without dropout, byte fallback or word affixes, each token made by one
  merge, and post-processors that leave offsets as they are;
- added tokens matched as they are (no lstrip, rstrip or single_word), none inside another.
Anything else uses `tokenizers`. The tests compare both encoders' ids and offsets on varied text.
"""

import json
from concurrent.futures import ThreadPoolExecutor
from itertools import chain, repeat
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer

from stages.lib.base.workers import available_cores
from stages.lib.tokenizing.special_tokens import SpecialTokens, added_tokens

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# Digits(individual_digits=True) then GPT-2's pattern, as one pattern: every digit alone, and a run of spaces
# before a digit ends there whole (the digit starts a new piece, so no space is left to join it).
DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""


class Encoded(NamedTuple):
    """A chunk of documents, encoded."""

    ids: np.ndarray  # every document's ids, each followed by EOS, back to back (int64)
    lengths: np.ndarray  # tokens per document, its EOS included
    offsets: dict  # document index -> (tokens, 2) character offsets of its tokens (EOS excluded)
    spelled: dict = {}  # document index -> the special tokens its data spells (encoded as text), for the summary


class TokenizersEncoder:
    """The `tokenizers` library's own encode_batch, which spreads the documents over the cores."""

    name = "tokenizers"

    def __init__(self, backend: Any, special: SpecialTokens | None = None):
        self.backend = backend
        self.special = special if special is not None else SpecialTokens(added_tokens(backend))
        self._as_text = None  # a copy of the backend that reads special tokens as text, made when first needed

    def encode(self, texts: list[str], eos_id: int, offsets_for: list[int],
               control: list | None = None) -> Encoded:
        """Encode documents; character offsets for those in `offsets_for`. `control`: each document's control
        ranges (stages/lib/tokenizing/special_tokens.py); None: special tokens are matched anywhere."""
        spelled = _spelled(self.special, texts, control)
        # Offsets cost time and memory; only documents mixing prompt and response text need them.
        encode = self.backend.encode_batch if offsets_for else self.backend.encode_batch_fast
        encodings = encode(texts, add_special_tokens=False)
        id_lists = [enc.ids for enc in encodings]
        offsets = {i: encodings[i].offsets for i in offsets_for}
        for i in spelled:  # rare: encoded again, cut at the template's special tokens
            id_lists[i], piece_offsets = self._pieces(texts[i], control[i])
            if i in offsets:
                offsets[i] = piece_offsets
        lengths = np.fromiter((len(ids) + 1 for ids in id_lists), np.int64, count=len(id_lists))
        ids = np.fromiter(chain.from_iterable(chain.from_iterable(zip(id_lists, repeat((eos_id,))))), np.int64,
                          count=int(lengths.sum()))
        return Encoded(ids, lengths, offsets, spelled)

    def _pieces(self, text: str, control: list) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and offsets of a document whose data spells special tokens: those read as text."""
        if self._as_text is None:
            self._as_text = Tokenizer.from_str(self.backend.to_str())
            self._as_text.encode_special_tokens = True
        ids, offsets = [], []
        for piece in self.special.pieces(text, control):
            if piece.token is not None:
                ids.append(self.special.ids[piece.token])
                offsets.append((piece.start, piece.end))
                continue
            enc = self._as_text.encode(text[piece.start:piece.end], add_special_tokens=False)
            ids += enc.ids
            offsets += [(a + piece.start, b + piece.start) for a, b in enc.offsets]
        return ids, offsets


class TiktokenEncoder:
    """tiktoken over ranks built from a byte-level BPE's merges; ids mapped back to the tokenizer's own."""

    name = "tiktoken"

    def __init__(self, pattern: str, ranks: dict[bytes, int], specials: dict[str, int], rank_to_id: np.ndarray,
                 eos: str, special: SpecialTokens | None = None):
        import tiktoken

        self.encoding = tiktoken.Encoding("stepwise", pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=specials)
        self.specials = frozenset(specials)
        self.special_ranks = specials
        self.special = special or SpecialTokens([{"content": s, "special": True} for s in specials])
        self.words = frozenset(specials) - set(self.special.ids)  # added tokens that are not special: vocabulary
        self.rank_to_id = rank_to_id
        self.rank_bytes = np.zeros(len(rank_to_id), np.int64)  # bytes of text each rank stands for
        for token, rank in chain(ranks.items(), ((s.encode("utf-8"), r) for s, r in specials.items())):
            self.rank_bytes[rank] = len(token)
        self.eos, self.eos_rank = eos, specials[eos]
        self.threads = available_cores()
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def encode(self, texts: list[str], eos_id: int, offsets_for: list[int],
               control: list | None = None) -> Encoded:
        """Encode documents; character offsets for those in `offsets_for`. `control`: each document's control
        ranges (stages/lib/tokenizing/special_tokens.py); None: special tokens are matched anywhere."""
        spelled = _spelled(self.special, texts, control)
        # A document holding the EOS text itself, or spelling special tokens in its data, is encoded alone; runs
        # of the others together.
        alone = [i for i, text in enumerate(texts) if i in spelled or self.eos in text]
        parts, lengths, at = [], [], 0
        for i in [*alone, len(texts)]:
            if i > at:
                ranks = self._together(texts[at:i])
                parts.append(ranks)
                lengths.append(np.diff(np.flatnonzero(ranks == self.eos_rank), prepend=-1))
            if i < len(texts):
                ranks = self._alone(texts[i], control[i] if i in spelled else None)
                parts.append(ranks)
                lengths.append(np.array([len(ranks)], np.int64))
            at = i + 1
        ranks = np.concatenate(parts) if parts else np.zeros(0, np.uint32)
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        starts = np.cumsum(lengths) - lengths
        offsets = {i: _char_offsets(texts[i], self.rank_bytes[ranks[starts[i]:starts[i] + lengths[i] - 1]])
                   for i in offsets_for}
        return Encoded(self.rank_to_id[ranks], lengths, offsets, spelled)

    def _together(self, texts: list[str]) -> np.ndarray:
        """Ranks of documents that hold no EOS text, each followed by EOS, in few large calls.

        The EOS between documents is split off first, as tokenizers does, so joining documents changes nothing;
        one call per core, since tiktoken releases the GIL while it encodes.
        """
        groups = [self.eos.join(group) + self.eos for group in _groups(texts, self.threads)]
        parts = list(self.pool.map(self._ranks, groups)) if len(groups) > 1 else [self._ranks(g) for g in groups]
        return np.concatenate(parts) if parts else np.zeros(0, np.uint32)

    def _alone(self, text: str, control: list | None) -> np.ndarray:
        """Ranks of one document and its EOS; `control` given: its data spells special tokens, read as text."""
        if control is None:
            return self._ranks(text + self.eos)
        parts = [np.array([self.special_ranks[p.token]], np.uint32) if p.token is not None else
                 self.encoding.encode_to_numpy(text[p.start:p.end], allowed_special=self.words, disallowed_special=())
                 for p in self.special.pieces(text, control)]
        return np.concatenate([*parts, np.array([self.eos_rank], np.uint32)])

    def _ranks(self, text: str) -> np.ndarray:
        return self.encoding.encode_to_numpy(text, allowed_special=self.specials, disallowed_special=())


def _spelled(special: SpecialTokens, texts: list[str], control: list | None) -> dict[int, list[str]]:
    """Document index -> the special tokens its data spells, for the documents that spell any."""
    if control is None:
        return {}
    found = ((i, special.spelled(text, ranges)) for i, (text, ranges) in enumerate(zip(texts, control)))
    return {i: tokens for i, tokens in found if tokens}


def _groups(texts: list[str], n: int) -> list[list[str]]:
    """`texts` cut into at most n runs of consecutive documents of about equal length."""
    if n <= 1 or len(texts) < 2:
        return [texts] if texts else []
    bounds = np.cumsum([len(t) for t in texts])
    cuts = np.searchsorted(bounds, bounds[-1] * np.arange(1, n) / n, side="right")
    edges = [0, *sorted(set(int(c) for c in cuts if 0 < c < len(texts))), len(texts)]
    return [texts[a:b] for a, b in zip(edges, edges[1:])]


def _char_offsets(text: str, token_bytes: np.ndarray) -> np.ndarray:
    """(start, end) character offsets of consecutive tokens covering `text`, from their lengths in UTF-8 bytes.

    A token that ends inside a character (byte-level BPE may split one) covers that character, as in tokenizers.
    """
    ends = np.cumsum(token_bytes)
    starts = ends - token_bytes
    data = text.encode("utf-8")
    if len(data) == len(text):  # ASCII: bytes are characters
        return np.stack([starts, ends], axis=1)
    char_of_byte = np.cumsum((np.frombuffer(data, np.uint8) & 0xC0) != 0x80) - 1
    return np.stack([char_of_byte[starts], char_of_byte[ends - 1] + 1], axis=1)


def encoder_for(tokenizer_json: Path, backend: Any, eos: str, allow_tiktoken: bool = True) -> Any:
    """The tiktoken encoder when the tokenizer is one it runs exactly (see the module docstring), else tokenizers'."""
    data = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    special = SpecialTokens(data.get("added_tokens") or [])
    if allow_tiktoken:
        built = _tiktoken_parts(data, eos)
        if built is not None:
            return TiktokenEncoder(*built, eos, special)
    return TokenizersEncoder(backend, special)


def _tiktoken_parts(data: dict, eos: str) -> tuple | None:
    """(pattern, ranks, specials, rank_to_id) for tiktoken, or None when the tokenizer is not a shape it runs."""
    model = data.get("model") or {}
    pattern = _pattern(data.get("pre_tokenizer"))
    added = data.get("added_tokens") or []
    if (pattern is None or data.get("normalizer") is not None or model.get("type") != "BPE"
            or model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or not _offsets_kept(data.get("post_processor"))
            or not _added_plainly(added) or eos not in {a["content"] for a in added}):
        return None
    vocab, merges = model["vocab"], [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    to_byte = byte_decoder()
    special = {a["content"] for a in added}
    ranks = {bytes([b]): b for b in range(256)}
    if any(char not in vocab for char in to_byte):
        return None  # a byte with no token of its own
    for left, right in merges:
        joined = bytes(to_byte[c] for c in left + right)
        if joined in ranks:
            return None  # a token made by two merges
        ranks[joined] = len(ranks)
    merged = {left + right for left, right in merges}
    if any(token not in merged and token not in special and len(token) > 1 for token in vocab):
        return None  # a token no merge makes
    if not _each_token_is_its_own_bpe(vocab, model["merges"], merged):
        return None
    specials = {content: len(ranks) + i for i, content in enumerate(sorted(special))}
    ids = {**{token: i for token, i in vocab.items() if token not in special},
           **{a["content"]: a["id"] for a in added}}
    rank_to_id = np.zeros(len(ranks) + len(specials), np.int64)
    for token, i in ids.items():
        if token in special:
            rank_to_id[specials[token]] = i
        else:
            rank_to_id[ranks[bytes(to_byte[c] for c in token)]] = i
    return pattern, ranks, specials, rank_to_id


def _pattern(pre: Any) -> str | None:
    """tiktoken's split pattern for a pre-tokenizer it reproduces, else None."""
    def byte_level(p: Any, regex: bool) -> bool:
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space")
                and bool(p.get("use_regex", True)) == regex)

    if byte_level(pre, True):
        return GPT2_PATTERN
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else None
    if not steps or len(steps) != 2:
        return None
    first, second = steps
    if first.get("type") == "Digits" and first.get("individual_digits") and byte_level(second, True):
        return DIGITS_PATTERN
    regex = (first.get("pattern") or {}).get("Regex") if first.get("type") == "Split" else None
    if regex and first.get("behavior") == "Isolated" and not first.get("invert") and byte_level(second, False):
        return regex
    return None


def _offsets_kept(post: Any) -> bool:
    """Whether the post-processor leaves token offsets as the model gives them (no ByteLevel trimming)."""
    if post is None:
        return True
    if post.get("type") == "Sequence":
        return all(_offsets_kept(p) for p in post.get("processors", []))
    return post.get("type") != "ByteLevel" or not post.get("trim_offsets")


def _added_plainly(added: list[dict]) -> bool:
    """Whether added tokens are matched as exactly their text, and none is inside another."""
    if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added):
        return False
    contents = sorted({a["content"] for a in added}, key=len)
    return not any(short in long for i, short in enumerate(contents) for long in contents[i + 1:])


def _each_token_is_its_own_bpe(vocab: dict, merges: list, merged: set) -> bool:
    """Whether the BPE of every merged token's bytes is that token (the condition in the module docstring)."""
    from tokenizers import models

    # ignore_merges off (as in GPT-2; Llama 3 has it on): the plain BPE of the token, not a whole-word lookup.
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges])
    return all([t.id for t in bpe.tokenize(token)] == [vocab[token]] for token in merged)


def byte_decoder() -> dict[str, int]:
    """The byte each character of a byte-level BPE vocabulary stands for (GPT-2's printable byte mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {chr(b): b for b in printable}
    mapping.update({chr(256 + i): b for i, b in enumerate(others)})
    return mapping
