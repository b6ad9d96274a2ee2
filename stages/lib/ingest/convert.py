"""One record to its records.jsonl line: read through the field mapping, rendered with its template, checked, and
counted (stages/lib/ingest/tally.py). The render stage runs this for every record of every piece, in one process
or in several.

- The kind a record is read as: render.format (or the source's own format) when forced, else its file's, decided
  from the file's first usable record; a record of no known shape says which fields it has and how to map them.
- Templates (stages/lib/ingest/chat_templates.py): Alpaca for instruction data unless render.template names a chat
  template; ChatML or the HuggingFace tokenizer's chat template for chat data (loaded once per process, when first
  needed). A tokenizer template that has no place for tools gets none (the `tools` field is counted as dropped); one
  that cannot render tool calls makes such a conversation a bad record.
- Bad records stop the stage unless render.on_error: skip; suspicious ones are counted: an empty answer (output,
  or an assistant turn with neither text nor tool calls, or no assistant turn at all), a conversation with no user
  turn, a conversation ending on a user turn (that turn is kept, as context with nothing to learn), more characters
  than render.long_record_chars. An empty plain text document is dropped, and counted.
- Preference pairs (render.format: preference, or records with chosen and rejected) are read and rendered by
  stages/lib/ingest/preference.py.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from stages.lib.base.errors import UserError
from stages.lib.base.params import Params, RenderParams
from stages.lib.ingest import chat_templates as templates
from stages.lib.ingest.fields import Mapping, Read, detect_kind, read_chat, read_instruction, read_text, unknown_shape
from stages.lib.ingest.pieces import Piece
from stages.lib.ingest.preference import flag_pair, read_preference, render_pair
from stages.lib.ingest.readers import TOO_DEEP, Location, RecordError
from stages.lib.ingest.sources import Source
from stages.lib.ingest.tally import Stats
from stages.lib.tokenizing.loading import load_tokenizer_folder
from stages.lib.tokenizing.records import pair_line, record_line

READERS = {"text": read_text, "instruction": read_instruction, "chat": read_chat, "preference": read_preference}


@dataclass
class Context:
    """What a process needs to render pieces: the params, sources, mappings, a template chooser, and where to
    write (the output file itself, or with worker processes a folder for one part file per piece)."""

    params: Params
    sources: list[Source]
    mappings: list[Mapping]
    chooser: "TemplateChooser"  # below
    output: IO[str] | Path


def render_record(where: Location, item: Any, piece: Piece, ctx: Context, stats: Stats) -> str | None:
    """The records.jsonl line of one record, or None when it is skipped; counts it in stats."""
    render, mapping = ctx.params.render, ctx.mappings[piece.source]
    stats.records_read += 1
    try:
        if isinstance(item, RecordError):
            raise item
        forced = ctx.sources[piece.source].format or render.format
        kind = forced if forced != "auto" else "text" if piece.layout == "text" else piece.kind
        read = _read(kind, item, mapping, forced != "auto")
        if kind == "preference":  # stages/lib/ingest/preference.py
            segments, template = render_pair(read.value, piece.path, ctx.chooser)
            line = _record_line(where, kind, read.value.rendered)
        else:
            segments, template = _segments(kind, read, piece.path, ctx.chooser)
            line = _record_line(where, kind, segments)
    except templates.TemplateError as err:
        raise UserError(f"{where.described()}: {err}") from None
    except RecordError as err:
        _bad_record(where, str(err), render, stats)
        return None
    except RecursionError:  # a record nested deeper than Python's own limit, caught here whatever tripped on it
        _bad_record(where, TOO_DEEP, render, stats)
        return None
    characters, at = sum(len(s["text"]) for s in segments), str(where)
    if _flag(kind, read, characters, at, render, stats) and kind == "text":
        return None  # an empty document: nothing to train on, counted by _flag
    if _flag_answers(kind, read, at, stats) and render.empty_answers == "skip":
        stats.skip({**where.as_json(), "problem": "empty answer (render.empty_answers: skip)"})
        return None
    stats.dropped(read.dropped + list(piece.dropped) if piece.dropped else read.dropped, at)
    stats.records_written += 1
    stats.characters += characters
    if template:
        stats.templates.add(template)
    return line


def _read(kind: str, item: Any, mapping: Mapping, forced: bool) -> Read:
    """The record read as `kind`; a record of no known shape says so (unless the kind was forced)."""
    if kind not in READERS:  # a file with no record of a known shape
        raise RecordError(unknown_shape(item))
    try:
        return READERS[kind](item, mapping)
    except RecordError:
        if not forced and detect_kind(item, mapping) is None:
            raise RecordError(unknown_shape(item)) from None
        raise


def _segments(kind: str, read: Read, file: str, chooser: "TemplateChooser") -> tuple[list[dict], str | None]:
    """(segments, template used) for one record."""
    if kind == "text":
        return [templates.segment(read.value, True)], None
    tools = read.tools
    if kind == "instruction":
        template = chooser.for_instruction(file)
        if template == "alpaca":
            return templates.render_instruction(*read.value), template
        messages = templates.instruction_as_chat(*read.value)
    else:
        messages, template = read.value, chooser.for_chat(file)
    tokenizer = chooser.tokenizer if template == "tokenizer" else None
    if tokenizer is not None:
        if tools and not templates.accepts(tokenizer, "tools"):
            read.dropped.append("tools")  # counted: the template has nowhere to put them
            tools = None
        if any("tool_calls" in m for m in messages) and not templates.accepts(tokenizer, "tool_calls"):
            raise RecordError("the conversation has tool calls, which the tokenizer's chat template does not "
                              "render (it never mentions tool_calls); set render.template: chatml")
    try:
        return templates.render_chat(messages, template, tokenizer, tools), template
    except templates.TemplateError:
        raise
    except UserError as err:  # the chat template refused this conversation
        raise RecordError(str(err)) from None


def _flag(kind: str, read: Read, characters: int, where: str, render: RenderParams, stats: Stats) -> bool:
    """Count an empty plain text document (True) or a long record."""
    if kind == "text" and _blank(read.value):
        stats.flag("empty_document", where)
        return True
    if render.long_record_chars and characters > render.long_record_chars:
        stats.flag("long_record", where)
    return False


def _flag_answers(kind: str, read: Read, where: str, stats: Stats) -> bool:
    """Count what is suspicious about a record's turns; True when its answer is empty."""
    if kind == "text":
        return False
    if kind == "instruction":
        empty = _blank(read.value[2])
    elif kind == "preference":
        empty = flag_pair(read.value, where, stats)
    else:
        answers = [m for m in read.value if m["role"] == "assistant"]
        empty = not answers or any(_blank(m["content"]) and not m.get("tool_calls") for m in answers)
        if not any(m["role"] == "user" for m in read.value):
            stats.flag("no_user_turn", where)
        if read.value[-1]["role"] == "user":
            stats.flag("ends_on_user_turn", where)
    if empty:
        stats.flag("empty_answer", where)
    return empty


def _blank(text: str) -> bool:
    return not text or text.isspace()


class TemplateChooser:
    """Picks the template for each kind of data from render.template, loading the HF tokenizer only if needed."""

    def __init__(self, params: Params):
        self.params = params
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            tok = self.params.tokenizer
            self._tokenizer = load_tokenizer_folder(Path(tok.tokenizer_path), tok.trust_remote_code)
        return self._tokenizer

    def for_chat(self, file: str) -> str:
        """'chatml' or 'tokenizer' for the chat data in `file`."""
        chosen = self.params.render.template
        if chosen == "alpaca":
            raise UserError(f"{file} holds chat data, which render.template = 'alpaca' cannot render (Alpaca has "
                            "one instruction and one answer); use auto, chatml or tokenizer")
        if chosen == "auto":
            hf = self.params.tokenizer.tokenizer_type == "huggingface"
            return "tokenizer" if hf and templates.has_chat_template(self.tokenizer) else "chatml"
        if chosen == "tokenizer" and not templates.has_chat_template(self.tokenizer):
            raise UserError(f"render.template = 'tokenizer' but the tokenizer at tokenizer.tokenizer_path = "
                            f"{self.params.tokenizer.tokenizer_path!r} has no chat template; use chatml or auto")
        return chosen

    def for_instruction(self, file: str) -> str:
        """'alpaca', or a chat template when render.template asks for one."""
        chosen = self.params.render.template
        return "alpaca" if chosen in ("auto", "alpaca") else self.for_chat(file)


def _record_line(where: Location, kind: str, segments: list[dict] | dict) -> str:
    try:
        return pair_line(str(where), segments) if kind == "preference" else record_line(str(where), kind, segments)
    except ValueError as err:
        raise RecordError(str(err)) from None


def _bad_record(where: Location, problem: str, render: RenderParams, stats: Stats) -> None:
    if render.on_error == "stop":
        raise UserError(f"{where.described()}: {problem}. Fix the record, or set render.on_error: skip to skip "
                        "bad records (they are counted in data/rendered/stats.json)")
    stats.skip({**where.as_json(), "problem": problem})
