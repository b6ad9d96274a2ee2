"""A record larger than tokenize.chunk_mb, read and encoded in pieces, so that the tokenize stage never holds it whole
(a book with no paragraph break, a pasted log: one line of records.jsonl of gigabytes).

Reading: one pass over the line keeps its JSON with every string longer than SHORT_STRING bytes left out (the
"skeleton": keys, flags, short strings) and notes, in each long string, places about `block` bytes apart where
its raw JSON can be cut (not inside an escape or a UTF-8 character); a second pass decodes a long string one
such block at a time.

Cutting the text for the encoder: before a space that follows a character other than whitespace, so that each
piece is about `piece_chars` long. No token of a byte-level BPE with GPT-2's split pattern (or the one that
splits digits one by one) holds a character other than whitespace followed by whitespace, and special tokens are
split off first, so the pieces' ids are exactly the whole text's (`Piece.exact` false when the text had no such
space within reach and was cut between two characters elsewhere). Other pre-tokenizers may give a token or two
different at each cut: the tokenize stage says so.
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Iterator

SHORT_STRING = 1 << 16  # bytes: a longer JSON string of the record is streamed, not held
_QUOTE_OR_ESCAPE = re.compile(rb'["\\]')
_PLACEHOLDER = "\x00long string "


@dataclass
class LongString:
    """A JSON string of the line left out of the skeleton: raw bytes [cuts[i], cuts[i + 1]) decode one by one."""

    cuts: list[int]


@dataclass
class TextPiece:
    """A piece of a long document's text, with its response ranges and control ranges relative to the piece."""

    text: str
    response_spans: list[tuple[int, int]]
    control: list[tuple[int, int]]
    last: bool
    exact: bool = True  # False: cut where the pre-tokenizer may not split (no space nearby)


def scan(fd: int, offset: int, length: int, block: int) -> tuple[bytes, list[LongString]]:
    """The line's skeleton (its JSON, each long string replaced by a placeholder) and its long strings: those over
    SHORT_STRING or `block` bytes, so that no block decoded later is much over `block` bytes."""
    skeleton, longs = bytearray(), []
    in_string, escape_end, string = False, -1, None
    pending = bytearray()  # a string's raw bytes while it is still short
    pos, end = offset, offset + length
    while pos < end:
        data = os.pread(fd, min(block, end - pos), pos)
        i = 0
        while i < len(data):
            if not in_string:
                j = data.find(b'"', i)
                if j < 0:
                    skeleton += data[i:]
                    break
                skeleton += data[i:j + 1]
                in_string, string, i = True, None, j + 1
                pending.clear()
                start = pos + i
                continue
            if escape_end > pos + i:  # the rest of an escape that began in the previous block
                i = escape_end - pos
                continue
            m = _QUOTE_OR_ESCAPE.search(data, i)
            stop = m.start() if m else len(data)
            if string is None and len(pending) + stop - i > min(SHORT_STRING, block):
                string = LongString([start])
                longs.append(string)
            if string is None:
                pending += data[i:stop]
            else:
                _note_cuts(string, data, pos, i, stop, escape_end, block)
            if m is None:
                break
            if m.group() == b'"':
                if string is None:
                    skeleton += pending + b'"'
                else:
                    string.cuts.append(pos + stop)
                    skeleton += json.dumps(f"{_PLACEHOLDER}{len(longs) - 1}").encode()[1:]
                in_string, i = False, stop + 1
                continue
            after = data[stop + 1:stop + 2] or os.pread(fd, 1, pos + stop + 1)
            size = 6 if after == b"u" else 2
            escape_end = pos + stop + size
            if string is None:
                pending += data[stop:stop + size]
                if stop + size > len(data):  # the escape continues in the next block
                    pending += os.pread(fd, stop + size - len(data), pos + len(data))
            i = stop + size
        pos += len(data)
    return bytes(skeleton), longs


def _note_cuts(string: LongString, data: bytes, pos: int, i: int, stop: int, escape_end: int, block: int) -> None:
    """Add the places to cut in the plain stretch data[i:stop] of a long string: at least `block` bytes apart, never
    right after an escape, never inside a UTF-8 character."""
    at = max(string.cuts[-1] + block, pos + i + 1, escape_end + 1)
    while at < pos + stop:
        k = at - pos
        while k < stop and 0x80 <= data[k] < 0xC0:  # a UTF-8 continuation byte: not a character's start
            k += 1
        if k >= stop:
            return
        string.cuts.append(pos + k)
        at = pos + k + block


def parse_skeleton(skeleton: bytes, longs: list[LongString]) -> dict:
    """The record with each long string as its LongString; ValueError when a long string is anything but a
    segment's text, or the record is not of the records format."""
    record = json.loads(skeleton.decode("utf-8"))
    segments = record.get("segments") if isinstance(record, dict) else None
    if not isinstance(segments, list):
        raise ValueError("expected a JSON object with a \"segments\" list")
    for segment in segments:
        text = segment.get("text") if isinstance(segment, dict) else None
        if isinstance(text, str) and text.startswith(_PLACEHOLDER):
            segment["text"] = longs[int(text[len(_PLACEHOLDER):])]
    if _holds_placeholder(record):
        raise ValueError(f"a field other than a segment's text is longer than {SHORT_STRING:,} bytes")
    return record


def _holds_placeholder(value: object) -> bool:
    if isinstance(value, str):
        return value.startswith(_PLACEHOLDER)
    if isinstance(value, dict):
        return any(_holds_placeholder(k) or _holds_placeholder(v) for k, v in value.items())
    return isinstance(value, list) and any(_holds_placeholder(v) for v in value)


def segment_text(fd: int, text: str | LongString) -> Iterator[str]:
    """A segment's text, one decoded block at a time."""
    if isinstance(text, str):
        yield text
        return
    for a, b in zip(text.cuts, text.cuts[1:]):
        yield json.loads(b'"' + os.pread(fd, b - a, a) + b'"')


def text_pieces(fd: int, segments: list[dict], piece_chars: int) -> Iterator[TextPiece]:
    """The document's text in pieces of about `piece_chars` characters (see the module docstring for the cuts)."""
    buffer, spans, control = "", [], []
    for segment in segments:
        at_segment = 0  # characters of this segment already in the buffer or before it
        marks = [tuple(pair) for pair in segment.get("control", ())]
        for text in segment_text(fd, segment["text"]):
            start = len(buffer)
            buffer += text
            if segment["response"]:
                spans.append((start, len(buffer)))
            control += [(start + a - at_segment, start + b - at_segment) for a, b in marks
                        if at_segment <= a < at_segment + len(text)]
            at_segment += len(text)
            while len(buffer) >= 2 * piece_chars:
                cut, exact = _cut(buffer, piece_chars, control)
                yield TextPiece(buffer[:cut], _clip(spans, 0, cut), _clip(control, 0, cut), False, exact)
                # a control range may run past the buffer's end, into text still to come
                buffer, spans, control = buffer[cut:], _clip(spans, cut, _NO_END), _clip(control, cut, _NO_END)
    yield TextPiece(buffer, spans, control, True)


_SPACE_AFTER_TEXT = re.compile(r"(?<=\S) ")
_NO_END = 1 << 62


def _cut(buffer: str, piece_chars: int, control: list[tuple[int, int]]) -> tuple[int, bool]:
    """Where to cut the buffer: the first space after a non-space character in [piece_chars, 2 * piece_chars), not
    inside a control range; else at 2 * piece_chars (not exact)."""
    at = None
    for m in _SPACE_AFTER_TEXT.finditer(buffer, piece_chars, 2 * piece_chars):
        if not any(a < m.start() < b for a, b in control):
            at = m.start()
            break
    if at is not None:
        return at, True
    at = 2 * piece_chars
    for a, b in control:
        if a < at < b:
            at = a if a > 0 else b  # before the control text, or after it when it starts the buffer
    return at, False


def _clip(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of `ranges` inside [lo, hi), shifted to start at lo (empty ranges at lo..hi kept)."""
    return [(max(a, lo) - lo, min(b, hi) - lo) for a, b in ranges if a < hi and b > lo or a == b and lo <= a < hi]
