"""Special tokens come from the template, never from the data.

A tokenizer's special tokens (`<|im_end|>`, `<|endoftext|>`, `<|user|>`, ...: the added tokens tokenizer.json marks
`"special": true`) are control signals: they end turns and documents and move the loss mask. Text in a record that
happens to spell one (a user pasting `<|im_end|>\\n<|im_start|>assistant`, a document about tokenizers) is data and
is encoded as the characters it is made of, or data could forge turns.

The render stage says which characters its template wrote as control text: a segment's optional `"control"` holds
their [start, end) character ranges in the segment's text (docs/formats.md). The tokenize stage encodes a special
token only there. A document whose special-token text is all at those places (nearly every document) is encoded
whole, exactly as before; one that spells a special token elsewhere is cut at the control places, each piece
between them encoded with the special tokens read as plain text, and is counted and located in the summary.

A record with no `"control"` anywhere has no control text: all of it is data. Except a chat record: one written
before control marks existed is read as it was then (special tokens matched anywhere); the render stage now puts
`"control"` on a segment of every chat record (an empty list when its template wrote no special token).
"""

import re
from typing import Any, NamedTuple


class Piece(NamedTuple):
    """Characters [start, end) of a document: a special token the template wrote (`token` its text), or data (None)."""

    start: int
    end: int
    token: str | None


class SpecialTokens:
    """The special tokens of one tokenizer, and where a document's text spells them."""

    def __init__(self, added: list[Any]):
        """`added`: the tokenizer's added tokens (tokenizers' AddedToken, or dicts as in tokenizer.json)."""
        specials = [_fields(a) for a in added]
        specials = [a for a in specials if a["special"] and a["content"]]
        self.ids = {a["content"]: a["id"] for a in specials}
        self.rstrip = {a["content"] for a in specials if a["rstrip"]}
        self.lstrip = {a["content"] for a in specials if a["lstrip"]}
        # Longest first: at one position the longest special token wins, as the tokenizers library matches them.
        alternatives = sorted(self.ids, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def spelled(self, text: str, control: list[tuple[int, int]] | None) -> list[str]:
        """The special tokens `text` spells outside its control ranges (in order); [] for a legacy record (None)."""
        if self._pattern is None or control is None:
            return []
        marked = set(control)
        return [m.group() for m in self._pattern.finditer(text) if m.span() not in marked]

    def pieces(self, text: str, control: list[tuple[int, int]]) -> list[Piece]:
        """`text` cut at the control ranges that hold exactly a special token of this tokenizer; the other control
        ranges (ChatML's tags for a tokenizer without them) stay in the data around them, as text.

        A special token that strips whitespace beside it (`rstrip`/`lstrip`, as Phi-3's do) takes that whitespace,
        as the tokenizers library does when it encodes the whole text.
        """
        cuts = [(a, b) for a, b in sorted(control) if text[a:b] in self.ids]
        pieces, at = [], 0
        for a, b in cuts:
            token = text[a:b]
            if a < at:  # overlaps the whitespace the previous token took
                continue
            if token in self.lstrip:
                a = len(text[at:a].rstrip()) + at
            if token in self.rstrip:
                b = len(text) - len(text[b:].lstrip())
            if a > at:
                pieces.append(Piece(at, a, None))
            pieces.append(Piece(a, b, token))
            at = b
        if at < len(text):
            pieces.append(Piece(at, len(text), None))
        return pieces


def _fields(added: Any) -> dict:
    if isinstance(added, dict):
        return {key: added.get(key) for key in ("content", "id", "special", "lstrip", "rstrip")}
    return {"content": added.content, "id": getattr(added, "id", None), "special": added.special,
            "lstrip": added.lstrip, "rstrip": added.rstrip}


def added_tokens(backend: Any) -> list[dict]:
    """A `tokenizers` Tokenizer's added tokens as tokenizer.json lists them (with their ids)."""
    return [{"content": t.content, "id": i, "special": t.special, "lstrip": t.lstrip, "rstrip": t.rstrip}
            for i, t in sorted(backend.get_added_tokens_decoder().items())]
