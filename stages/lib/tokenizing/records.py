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
    texts, spans, control, marked, at = [], [], [], False, 0
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
        if CONTROL_KEY in segment:
            marked = True
            control += _control_ranges(segment[CONTROL_KEY], text, at)
        texts.append(text)
        at += len(text)
    # A chat record with no control marks at all was written before them: read as then (control None).
    return Document("".join(texts), spans, None if not marked and record.get("kind") == "chat" else control)


def _control_ranges(marks: object, text: str, at: int) -> list[tuple[int, int]]:
    """A segment's control ranges as offsets into the document's text (the segment starts at `at`)."""
    if not isinstance(marks, list) or not all(isinstance(pair, list) and len(pair) == 2
                                              and all(type(x) is int for x in pair)
                                              and 0 <= pair[0] < pair[1] <= len(text) for pair in marks):
        raise ValueError(f"each \"{CONTROL_KEY}\" entry must be [start, end] character offsets inside its segment's "
                         f"text, got {marks!r}")
    return [(at + a, at + b) for a, b in marks]


def templates_used(rendered_dir: Path, required: bool = False) -> list[str] | None:
    """The templates the render stage used (from its stats.json); None when there is no stats.json.

    `required`: a missing stats.json is an error saying to run the render stage.
    """
    stats = read_stats(rendered_dir)
    if stats is None:
        if required:
            raise UserError(f"{Path(rendered_dir) / STATS_FILE} not found: run the render stage first (dvc repro "
                            "render)")
        return None
    used = stats.get("templates") if isinstance(stats, dict) else None
    return list(used) if isinstance(used, list) else []


def read_stats(rendered_dir: Path) -> Any:
    """The render stage's stats.json as parsed, None when there is none; a UserError when it is damaged."""
    path = Path(rendered_dir) / STATS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is damaged ({err}); rerun the render stage (dvc repro -f render)") from None
