"""Rendered records (docs/formats.md, "Rendered records"): the render stage writes them; the tokenizer and tokenize
stages read them, and generate reads which templates they used."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.lib.base.errors import UserError

RECORDS_FILE = "records.jsonl"
STATS_FILE = "stats.json"
CONTROL_KEY = "control"  # a segment's control text: stages/lib/tokenizing/special_tokens.py


@dataclass
class Document:
    """One rendered record: its whole text and the character ranges that count in the loss.

    An empty response segment (an empty answer) is an empty range: the answer has no text, but ending it does, so
    the EOS after it still counts. `control`: the character ranges the template wrote as control text, where a
    special token may be encoded (stages/lib/tokenizing/special_tokens.py); None for a chat record from before
    control marks.
    """

    text: str
    response_spans: list[tuple[int, int]]
    control: list[tuple[int, int]] | None = field(default_factory=list)

    def all_response(self) -> bool:
        """True when every character is response text (plain text records)."""
        return self.response_spans == [(0, len(self.text))]


def record_line(source: str, kind: str, segments: list[dict]) -> str:
    """One line of records.jsonl; ValueError when the text cannot be written as UTF-8 (a lone surrogate)."""
    return _line({"source": source, "kind": kind, "segments": segments})


def pair_line(source: str, pair: dict) -> str:
    """One line of records.jsonl for a preference pair ({"prompt": text, "chosen": segments, "rejected": ...})."""
    return _line({"source": source, "kind": "preference", **pair})


def _line(record: dict) -> str:
    line = json.dumps(record, ensure_ascii=False) + "\n"
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone UTF-16 surrogate escape (such as \\ud800), which is not valid "
                         "text") from None
    return line


def parse_record(line: bytes | str) -> Document:
    """One line of records.jsonl as a Document; ValueError says what is wrong with it."""
    try:
        record = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except ValueError as err:
        raise ValueError(f"not valid JSON ({err})") from None
    return as_document(record)


def as_document(record: object) -> Document:
    """A parsed line of records.jsonl as a Document; ValueError says what is wrong with it."""
    segments = record.get("segments") if isinstance(record, dict) else None
    if segments is None and isinstance(record, dict) and record.get("kind") == "preference":
        # A preference pair reads as its prompt and chosen answer: the tokenizer learns from that text, and an
        # SFT run on pairs learns the chosen answers.
        segments = [*(record.get("prompt") or []), *(record.get("chosen") or [])]
    if not isinstance(segments, list):
        raise ValueError("expected a JSON object with a \"segments\" list")
    texts, spans, at = [], [], 0
    for segment in segments:
        text = segment.get("text") if isinstance(segment, dict) else None
        response = segment.get("response") if isinstance(segment, dict) else None
        if not isinstance(text, str) or not isinstance(response, bool):
            raise ValueError("each segment must be {\"text\": string, \"response\": true or false}")
        if response:
            if spans and spans[-1][1] == at:  # neighbouring response segments form one span
                spans[-1] = (spans[-1][0], at + len(text))
            else:
                spans.append((at, at + len(text)))
        texts.append(text)
        at += len(text)
    return Document("".join(texts), spans, control_ranges(record.get("kind"), segments))


def control_ranges(kind: Any, segments: list[dict]) -> list[tuple[int, int]] | None:
    """The control ranges of a record's segments, as offsets into the document's text; None for a chat record with
    no `"control"` key on any segment (written before control marks: stages/lib/tokenizing/special_tokens.py).
    ValueError when an entry is malformed."""
    if kind == "chat" and not any(CONTROL_KEY in s for s in segments):
        return None
    ranges, at = [], 0
    for s in segments:
        text = s["text"]
        for pair in s.get(CONTROL_KEY, ()):
            if not (isinstance(pair, list) and len(pair) == 2 and all(type(x) is int for x in pair)
                    and 0 <= pair[0] < pair[1] <= len(text)):
                raise ValueError(f"each \"{CONTROL_KEY}\" entry must be [start, end] character offsets inside its "
                                 f"segment's text, got {pair!r}")
            ranges.append((at + pair[0], at + pair[1]))
        at += len(text)
    return ranges


def templates_used(rendered_dir: Path, required: bool = False) -> list[str] | None:
    """The templates the render stage used (from its stats.json); None when there is no stats.json.

    `required`: a missing stats.json is an error saying to run the render stage.
    """
    path = Path(rendered_dir) / STATS_FILE
    if not path.is_file():
        if required:
            raise UserError(f"{path} not found: run the render stage first (dvc repro render)")
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({err}); rerun the render stage (dvc repro -f render)") from None
    used = stats.get("templates") if isinstance(stats, dict) else None
    return list(used) if isinstance(used, list) else []
