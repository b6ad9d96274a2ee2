"""Render stage: raw data -> data/rendered/records.jsonl + data/rendered/stats.json (see docs/formats.md).

    python -m stages.render

Reads `render.data_path`: one file, a folder (its .txt, .json and .jsonl files, not subfolders) or a glob, in
sorted path order. Each file is one of:

- plain text (`.txt`): cut into documents by `render.text_split`: `paragraph` = runs of lines separated by one or
  more blank (empty or whitespace-only) lines; `line` = each non-blank line; `file` = the whole file. A document
  is one segment with `response: true`.
- instruction data: objects with `instruction`, `output` and an optional `input` (missing or null = empty),
  rendered with the Alpaca prompt (stages/lib/templates.py), or with a chat template as a user/assistant exchange
  when `render.template` is `chatml` or `tokenizer`.
- chat data: objects with `messages: [{role, content}]` (roles system, user, assistant) or the ShareGPT shape
  `conversations: [{from, value}]` (from: system, human or user, gpt or assistant), rendered with ChatML or the
  HuggingFace tokenizer's chat template.

JSON files hold either a JSON array of objects or one object per line (JSONL); the first non-blank character
decides. With `render.format: auto` a `.txt` file is text and a JSON file's first record decides its kind
(`messages`/`conversations`: chat; `instruction`/`output`: instruction). Fixed up silently: a UTF-8 byte order
mark, CRLF line endings (made "\\n" in text and in every string), a missing final newline, blank lines in JSONL and
unknown extra fields. Records that cannot be used (malformed JSON, a missing or non-string field, bytes that are not
UTF-8, an unknown role) stop the stage with their `file:line` (`file[i]` for element i of a JSON array) unless
`render.on_error: skip`, which skips and counts them in stats.json.

Records are written as they are read (only a JSON array file is loaded whole), to temporary files renamed at the
end; the same input always gives byte-identical outputs.
"""

import glob
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from stages.lib import templates
from stages.lib.errors import UserError, run_stage
from stages.lib.files import replaced_file
from stages.lib.params import RENDERED_DIR, Params, load_params
from stages.lib.records import RECORDS_FILE, STATS_FILE, record_line

DATA_SUFFIXES = (".txt", ".json", ".jsonl")
JSON_SUFFIXES = (".json", ".jsonl")
MAX_SKIPPED_LISTED = 100  # stats.json lists the first ones; the count covers all
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RecordError(Exception):
    """One record that cannot be rendered; skippable with render.on_error: skip."""


@dataclass(frozen=True)
class Location:
    """Where a record comes from: a line of a file, or an element of a JSON array."""

    file: str
    line: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.index is not None:
            return f"{self.file}[{self.index}]"
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def described(self) -> str:
        """The location as an error message names it."""
        if self.index is not None:
            return f"{self} (element {self.index} of the JSON array, counting from 0)"
        return str(self)

    def as_json(self) -> dict:
        where = {"record": self.index} if self.index is not None else {"line": self.line}
        return {"file": self.file, **where}


@dataclass
class Stats:
    """Counts for stats.json."""

    records_read: int = 0
    records_written: int = 0
    records_skipped: int = 0
    characters: int = 0
    skipped: list = field(default_factory=list)
    formats: dict = field(default_factory=dict)
    templates: set = field(default_factory=set)

    def as_json(self) -> dict:
        return {"records_read": self.records_read, "records_written": self.records_written,
                "records_skipped": self.records_skipped, "characters": self.characters, "skipped": self.skipped,
                "formats": self.formats, "templates": sorted(self.templates)}


def main() -> None:
    """Entry point: render with params.yaml into data/rendered/."""
    render(load_params(), RENDERED_DIR)


def render(params: Params, out_dir: str | Path) -> dict:
    """Render every input file into out_dir/records.jsonl and out_dir/stats.json; return the stats."""
    out_dir = Path(out_dir)
    files = find_input_files(params.render.data_path)
    chooser = TemplateChooser(params)
    stats = Stats()
    with replaced_file(out_dir / RECORDS_FILE) as out:
        for path in files:
            for record in _file_records(path, params, chooser, stats):
                out.write(record)
        if stats.records_written == 0:
            raise UserError(f"no records were rendered from render.data_path = {params.render.data_path!r} "
                            f"({stats.records_read} read, {stats.records_skipped} skipped): the data is empty or "
                            "every record was bad")
    with replaced_file(out_dir / STATS_FILE) as out:
        out.write(json.dumps(stats.as_json(), indent=2, ensure_ascii=False) + "\n")
    _report(stats, out_dir)
    return stats.as_json()


def find_input_files(data_path: str) -> list[Path]:
    """The files render.data_path names, in sorted order; a clear error when it names none."""
    path = Path(data_path)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES]
        if not files:
            raise UserError(f"render.data_path = {data_path!r} is a folder with no .txt, .json or .jsonl file in it")
    elif path.is_file():
        files = [path]
    elif any(c in data_path for c in "*?["):
        files = [Path(p) for p in glob.glob(data_path, recursive=True) if Path(p).is_file()]
        if not files:
            raise UserError(f"render.data_path = {data_path!r} matches no file; check the pattern")
    else:
        raise UserError(f"render.data_path = {data_path!r} does not exist; set it to a file, a folder or a glob "
                        "of your raw data (relative to the repository root)")
    return sorted(files, key=lambda p: p.as_posix())


class TemplateChooser:
    """Picks the template for each kind of data from render.template, loading the HF tokenizer only if needed."""

    def __init__(self, params: Params):
        self.params = params
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_hf_tokenizer(self.params)
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


def load_hf_tokenizer(params: Params) -> Any:
    """The HuggingFace tokenizer at tokenizer.tokenizer_path, for its chat template."""
    path = params.tokenizer.tokenizer_path
    if not Path(path).is_dir():
        raise UserError(f"tokenizer.tokenizer_path = {path!r} is not a folder; it should hold tokenizer.json "
                        "and tokenizer_config.json")
    from transformers import AutoTokenizer  # slow import: only when a chat template is needed

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=params.tokenizer.trust_remote_code)
    except Exception as err:
        raise UserError(f"cannot load the tokenizer at tokenizer.tokenizer_path = {path!r}: {err}") from None


def _file_records(path: Path, params: Params, chooser: TemplateChooser, stats: Stats) -> Iterator[str]:
    """The rendered JSON lines of one file; bad records stop the stage or are counted, as on_error says."""
    file = path.as_posix()
    kind = _kind_from_name(path, params.render.format)
    stats.formats[file] = kind or "empty"
    if kind == "text":
        items = ((where, doc, "text") for where, doc in text_documents(path, params.render.text_split))
    else:
        items = _json_items(path, file, kind, stats)
    for where, item, item_kind in items:
        stats.records_read += 1
        try:
            if isinstance(item, RecordError):
                raise item
            segments, template = _render_item(item, item_kind, file, chooser)
            line = _record_line(where, item_kind, segments)
        except templates.TemplateError as err:
            raise UserError(f"{where.described()}: {err}") from None
        except RecordError as err:
            _bad_record(where, str(err), params, stats)
            continue
        stats.records_written += 1
        stats.characters += sum(len(s["text"]) for s in segments)
        if template:
            stats.templates.add(template)
        yield line


def _json_items(path: Path, file: str, kind: str | None, stats: Stats) -> Iterator[tuple]:
    """(location, object or RecordError, kind) for each record; with format auto the first record sets the kind."""
    for where, obj in json_records(path):
        if kind is None and not isinstance(obj, RecordError):
            kind = detect_kind(obj)
            if kind is None:
                yield where, RecordError(_UNKNOWN_SHAPE), None
                continue
            stats.formats[file] = kind
        yield where, obj, kind


_UNKNOWN_SHAPE = ("a record that is neither chat data ('messages' or 'conversations') nor instruction data "
                  "('instruction' and 'output')")


def _kind_from_name(path: Path, forced: str) -> str | None:
    if forced != "auto":
        return forced
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return "text"
    if suffix in JSON_SUFFIXES:
        return None  # decided by the first record
    raise UserError(f"{path.as_posix()}: cannot tell the format from the extension {suffix or '(none)'!r}; "
                    "use .txt, .json or .jsonl, or set render.format to text, instruction or chat")


def detect_kind(obj: Any) -> str | None:
    """'chat', 'instruction' or None for one JSON record."""
    if not isinstance(obj, dict):
        return None
    if "messages" in obj or "conversations" in obj:
        return "chat"
    if "instruction" in obj or "output" in obj:
        return "instruction"
    return None


def _render_item(item: Any, kind: str, file: str, chooser: TemplateChooser) -> tuple[list[dict], str | None]:
    """(segments, template used) for one record."""
    if kind == "text":
        return [templates.segment(item, True)], None
    if kind == "instruction":
        fields = instruction_fields(item)
        template = chooser.for_instruction(file)
        if template == "alpaca":
            return templates.render_instruction(*fields), template
        messages = templates.instruction_as_chat(*fields)
    else:
        messages = chat_messages(item)
        template = chooser.for_chat(file)
    try:
        return templates.render_chat(messages, template, chooser.tokenizer if template == "tokenizer" else None), \
            template
    except templates.TemplateError:
        raise
    except UserError as err:  # the chat template refused this conversation
        raise RecordError(str(err)) from None


def instruction_fields(obj: Any) -> tuple[str, str, str]:
    """(instruction, input, output) of an instruction record, checked and with CRLF made LF."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object with 'instruction' and 'output', got {_json_type(obj)}")
    for key in ("instruction", "output"):
        if key not in obj:
            raise RecordError(f"missing field '{key}' (instruction data needs 'instruction' and 'output')")
    values = []
    for key in ("instruction", "input", "output"):
        value = obj.get(key)
        if key == "input" and value is None:
            value = ""
        if not isinstance(value, str):
            raise RecordError(f"field '{key}' is {_json_type(value)}; expected a string")
        values.append(_lf(value))
    return values[0], values[1], values[2]


def chat_messages(obj: Any) -> list[dict]:
    """The `[{role, content}]` of a chat record (`messages`, or ShareGPT `conversations` mapped to roles)."""
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object with 'messages' or 'conversations', got {_json_type(obj)}")
    key = "messages" if "messages" in obj else "conversations"
    if key not in obj:
        raise RecordError("missing field 'messages' (or 'conversations')")
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"field '{key}' should be a non-empty list of messages, got {_json_type(turns)}")
    return [_message(turn, key, i) for i, turn in enumerate(turns)]


def _message(turn: Any, key: str, i: int) -> dict:
    role_key, content_key = ("role", "content") if key == "messages" else ("from", "value")
    if not isinstance(turn, dict):
        raise RecordError(f"{key}[{i}] is {_json_type(turn)}; expected an object with '{role_key}' and "
                          f"'{content_key}'")
    for k in (role_key, content_key):
        if k not in turn:
            raise RecordError(f"{key}[{i}] has no '{k}'")
    raw_role, content = turn[role_key], turn[content_key]
    roles = {r: r for r in templates.CHAT_ROLES} if key == "messages" else SHAREGPT_ROLES
    if not isinstance(raw_role, str) or raw_role not in roles:
        raise RecordError(f"{key}[{i}] has unknown {role_key} {raw_role!r}; expected one of {', '.join(roles)}")
    if not isinstance(content, str):
        raise RecordError(f"{key}[{i}].{content_key} is {_json_type(content)}; expected a string")
    return {"role": roles[raw_role], "content": _lf(content)}


def _record_line(where: Location, kind: str, segments: list[dict]) -> str:
    try:
        return record_line(str(where), kind, segments)
    except ValueError as err:
        raise RecordError(str(err)) from None


def _bad_record(where: Location, problem: str, params: Params, stats: Stats) -> None:
    if params.render.on_error == "stop":
        raise UserError(f"{where.described()}: {problem}. Fix the record, or set render.on_error: skip to skip "
                        "bad records (they are counted in data/rendered/stats.json)")
    stats.records_skipped += 1
    if len(stats.skipped) < MAX_SKIPPED_LISTED:
        stats.skipped.append({**where.as_json(), "problem": problem})


def text_documents(path: Path, split: str) -> Iterator[tuple[Location, str | RecordError]]:
    """The documents of a plain text file, cut by `split` (paragraph | line | file)."""
    file = path.as_posix()
    if split == "line":
        for number, line in read_lines(path):
            if isinstance(line, RecordError) or line.strip():
                yield Location(file, number), line
        return
    doc: list[str] = []
    first, bad = 0, None
    for number, line in read_lines(path):
        if split == "paragraph" and not isinstance(line, RecordError) and not line.strip():
            if doc or bad:
                yield Location(file, first), bad or "\n".join(doc)
            doc, bad = [], None
            continue
        if not doc and bad is None:
            first = number
        if isinstance(line, RecordError):
            bad = bad or line
            continue
        doc.append(line)
    if bad or (doc and "".join(doc).strip()):
        text = "\n".join(doc)
        yield Location(file, first), bad or (text.rstrip("\n") if split == "file" else text)


def read_lines(path: Path) -> Iterator[tuple[int, str | RecordError]]:
    """(line number, text without its line ending) for each line, decoded one line at a time."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, RecordError(f"bytes that are not UTF-8 at byte {err.start + 1} of the line "
                                          f"({raw[err.start:err.start + 4]!r}); save the file as UTF-8")
                continue
            yield number, text.removesuffix("\n").removesuffix("\r")


def json_records(path: Path) -> Iterator[tuple[Location, Any]]:
    """(location, parsed object or RecordError) for each record of a JSON array or JSONL file."""
    if _starts_with_bracket(path):
        yield from _json_array_records(path)
        return
    file = path.as_posix()
    for number, line in read_lines(path):
        if isinstance(line, RecordError):
            yield Location(file, number), line
        elif line.strip():
            try:
                yield Location(file, number), json.loads(line)
            except json.JSONDecodeError as err:
                yield Location(file, number), RecordError(f"malformed JSON ({err.msg} at column {err.colno})")


def _json_array_records(path: Path) -> Iterator[tuple[Location, Any]]:
    file = path.as_posix()
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        yield Location(file, line), RecordError("bytes that are not UTF-8 in this JSON array file; save it as "
                                                "UTF-8 (the whole file is skipped)")
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        yield Location(file, err.lineno), RecordError(f"the JSON array does not parse ({err.msg} at column "
                                                      f"{err.colno}); the whole file is unusable until fixed")
        return
    for index, obj in enumerate(records):
        yield Location(file, index=index), obj


def _starts_with_bracket(path: Path) -> bool:
    """Whether a JSON file holds a JSON array (first non-blank character '[') rather than JSONL."""
    with open(path, "rb") as f:
        while chunk := f.read(65536):
            rest = chunk.removeprefix(b"\xef\xbb\xbf").lstrip()
            if rest:
                return rest.startswith(b"[")
    return False


def _lf(text: str) -> str:
    return text.replace("\r\n", "\n")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _report(stats: Stats, out_dir: Path) -> None:
    print(f"render: {stats.records_written} records, {stats.characters:,} characters from "
          f"{len(stats.formats)} file(s) -> {out_dir / RECORDS_FILE}")
    if stats.records_skipped:
        first = "; ".join(f"{_skipped_where(s)} ({s['problem']})" for s in stats.skipped[:3])
        print(f"render: skipped {stats.records_skipped} bad record(s) (render.on_error: skip), first: {first}; "
              f"all counted in {out_dir / STATS_FILE}", file=sys.stderr)


def _skipped_where(entry: dict) -> str:
    if "record" in entry:
        return str(Location(entry["file"], index=entry["record"]))
    return str(Location(entry["file"], entry["line"]))


if __name__ == "__main__":
    run_stage(main)
