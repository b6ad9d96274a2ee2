"""Render stage: raw data -> data/rendered/records.jsonl + data/rendered/stats.json (see docs/formats.md).

    python -m stages.render

What it reads (stages/lib/tokenizing/mixture.py): `render.data_path` (a file, the data files of a folder and its
subfolders, hidden ones left out, or a glob, in sorted path order), or the weighted sources of `render.sources` inside
it, then `render.validation_path`, whose files are never training data. Files (stages/lib/ingest/readers.py), all
streamed: plain text `.txt`, JSON arrays, one JSON object (its list of records under `render.records_field`) and
JSONL (`.json`, `.jsonl`), each of these also compressed (`.gz`, `.zst`), and Parquet (`.parquet`). A file whose
bytes contradict its name (a `.zst` that is plain JSONL) stops the stage with what it looks like and the fix.

Each record (stages/lib/ingest/fields.py, with render.fields and render.roles) is one of:
- plain text: a document of a `.txt` file cut by `render.text_split` (`paragraph` = runs of lines between blank
  lines, `line`, `file`), or a record with a `text` field; one segment with `response: true`.
- instruction data: `instruction`, `output` and an optional `input` (missing or null = empty), rendered with the
  Alpaca prompt (stages/lib/ingest/chat_templates.py), or as a user/assistant exchange when `render.template` is
  `chatml` or `tokenizer`.
- chat data: `messages` (or ShareGPT `conversations`, or a bare list of messages), tool calls and tool results
  included, rendered with ChatML or the HuggingFace tokenizer's chat template; a field holding a list of
  conversations gives one record each (located as `record[i]`). Fields may be dotted paths into nested objects.
With `render.format: auto` a `.txt` file is text and a data file's first usable record (a Parquet file's columns)
decides the file's kind.

Fixed up silently: a UTF-8 byte order mark, CRLF line endings (made "\\n" in text and in every string), a missing
final newline, blank lines in JSONL. Records that cannot be used (malformed JSON, JSON nested too deep, a line
longer than `render.max_record_mb`, a missing or non-string field, bytes that are not UTF-8, an unknown role, a
content part that is not text) stop the stage with their location unless `render.on_error: skip`, which skips and
counts them. Suspicious records are counted with their first locations in stats.json and the summary: empty answers
(`render.empty_answers: skip` drops them), conversations without a user turn or ending on one, empty documents
(dropped), records longer than `render.long_record_chars`, and fields that nothing reads, by name.

The files are cut into pieces (stages/lib/ingest/pieces.py), rendered by `render.workers` processes (each writing a
piece to a part file, so memory holds no more than a record at a time) and written in order to a temporary file renamed
at the end: the same input gives byte-identical outputs with any number of processes. A worker that dies (the OOM
killer) stops the stage at once, naming the piece, and nothing is put in place.
"""

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

from stages.lib.base.errors import UserError, run_stage
from stages.lib.base.files import replaced_file
from stages.lib.base.params import RENDERED_DIR, Params, RenderParams, load_params
from stages.lib.base.progress import bar
from stages.lib.base.workers import WorkerDied, available_cores, ordered_map
from stages.lib.ingest.convert import Context, TemplateChooser, render_record
from stages.lib.ingest.fields import KINDS, Mapping, conversation_list, detect_kind, unknown_shape, with_field
from stages.lib.ingest.pieces import PIECE_BYTES, Piece, expanded, file_layout, plan_file, read_piece
from stages.lib.ingest.readers import Location, RecordError, check_content, open_parquet, split_suffix
from stages.lib.ingest.sources import DATA_SUFFIXES, Source, sources_of
from stages.lib.ingest.tally import Stats
from stages.lib.tokenizing.records import RECORDS_FILE, STATS_FILE

PARALLEL_FROM_BYTES = 32 << 20  # with render.workers: auto, smaller inputs are rendered in this process


def main() -> None:
    """Entry point: render with params.yaml into data/rendered/."""
    render(load_params(), RENDERED_DIR)


def render(params: Params, out_dir: str | Path, piece_bytes: int = PIECE_BYTES) -> dict:
    """Render every source into out_dir/records.jsonl and out_dir/stats.json; return the stats.

    `piece_bytes`: the size of the pieces the input files are cut into (the output does not depend on it).
    """
    out_dir, started = Path(out_dir), time.monotonic()
    sources = sources_of(params.render)
    mappings = [Mapping.build(params.render.fields, s.fields, params.render.roles) for s in sources]
    stats = Stats(sources=[s.describe() for s in sources])
    pieces = plan(sources, mappings, params.render, stats, piece_bytes)
    total = sum(p.input_bytes for p in pieces)
    workers = worker_count(params.render.workers, pieces)
    shown = bar(total=total, unit="B", unit_scale=True, desc="render", mininterval=0.5,
                disable=total < PARALLEL_FROM_BYTES)
    with replaced_file(out_dir / RECORDS_FILE) as out, shown, _tokenizer_loaded_once(params, workers), \
            tempfile.TemporaryDirectory(dir=out_dir, prefix=".render-parts-") as parts:
        # One process writes straight to the output; workers write each piece to a part file, copied in order.
        output = out if workers == 1 else Path(parts)
        handed = {}  # the pieces handed out and not written yet, by number; results come back in that order
        cut = expanded(pieces, params.render.text_split, piece_bytes, max_record_bytes(params.render))
        tasks = ((number, handed.setdefault(number, p)) for number, p in enumerate(cut))
        results = ordered_map(render_piece, tasks, workers, start_worker, (params, sources, mappings, output))
        for number, (part, piece_stats, error) in enumerate(_unless_a_worker_dies(results, handed)):
            piece = handed.pop(number)
            if error:
                raise UserError(error)
            if part:
                with open(part, encoding="utf-8", newline="") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
                os.unlink(part)
            piece_stats.written_by_source[piece.source] = piece_stats.records_written
            stats.merge(piece_stats)
            shown.update(piece.input_bytes)
        if stats.records_written == 0:
            raise UserError(f"no records were rendered from {_what(params.render)} ({stats.records_read} read, "
                            f"{stats.records_skipped} skipped): the data is empty or every record was bad")
    counted = stats.as_json()
    with replaced_file(out_dir / STATS_FILE) as out:
        out.write(json.dumps(counted, indent=2, ensure_ascii=False) + "\n")
    _report(stats, counted["sources"], out_dir, total, time.monotonic() - started, workers)
    return counted


def max_record_bytes(render: RenderParams) -> int:
    """render.max_record_mb in bytes."""
    return int(render.max_record_mb * (1 << 20))


def _unless_a_worker_dies(results: Iterator, handed: dict[int, Piece]) -> Iterator:
    """The results; a worker that died is a UserError naming the piece it had (`handed`: the pieces out, by number)."""
    try:
        yield from results
    except WorkerDied as died:
        number = died.item if died.item in handed else min(handed, default=None)
        piece = handed.get(number)
        which = "a piece of the input" if piece is None else f"piece {number} ({piece.path}" + (
            f", from line {piece.first_line})" if piece.layout in ("text", "jsonl") else ")")
        raise UserError(f"a render worker process {died.how()} while rendering {which}; the usual cause is memory "
                        "(the system's out-of-memory killer stops the largest process): set render.workers: 1 "
                        "(or fewer workers) to use less memory, or lower render.max_record_mb. Nothing was "
                        "written") from None


def plan(sources: list[Source], mappings: list[Mapping], render: RenderParams, stats: Stats,
         piece_bytes: int) -> list[Piece]:
    """The pieces of every file of every source, in order; each file's kind decided (and noted in stats)."""
    pieces = []
    for index, (source, mapping) in enumerate(zip(sources, mappings)):
        forced = source.format or render.format
        for path in source.files:
            check_content(path)
            kind = None if forced == "auto" else forced
            if kind is None and split_suffix(path)[0] not in DATA_SUFFIXES:
                raise UserError(f"{path.as_posix()}: cannot tell the format from the file name; use .txt, .json, "
                                ".jsonl or .parquet (optionally .gz or .zst), or set render.format")
            layout = file_layout(path, kind == "text", mapping.role)
            kind = kind or file_kind(path, layout, mapping, render)
            stats.formats[path.as_posix()] = kind
            pieces += plan_file(path, index, layout, kind, render.text_split, piece_bytes,
                                mapping.columns(kind) if kind in KINDS else ())
    return pieces


def file_kind(path: Path, layout: str, mapping: Mapping, render: RenderParams) -> str:
    """text, instruction or chat from a file's first usable record (a Parquet file: its columns); else empty."""
    if layout == "text":
        return "text"
    if layout == "parquet":
        names = open_parquet(path).schema_arrow.names
        kind = detect_kind({name: True for name in names}, mapping)
        if kind is None:
            raise UserError(f"{path.as_posix()}: {unknown_shape({name: None for name in names})}")
        return kind
    whole = Piece(path.as_posix(), 0, layout, "empty")
    for _, item in read_piece(whole, render.text_split, render.records_field, max_record_bytes(render)):
        kind = None if isinstance(item, RecordError) else detect_kind(item, mapping)
        if kind:
            return kind
    return "empty"


def worker_count(setting: int | str, pieces: list[Piece]) -> int:
    """Processes to render with: render.workers, or with auto every core for inputs big enough to gain."""
    # A compressed file becomes pieces only as it is read, and its text is several times its size.
    streamed = any(p.streamed for p in pieces)
    if setting == "auto":
        size = sum(p.input_bytes * (4 if p.streamed else 1) for p in pieces)
        setting = available_cores() if size >= PARALLEL_FROM_BYTES else 1
    return max(1, setting if streamed else min(setting, len(pieces)))


_context: Context | None = None  # set in each rendering process by start_worker
_forked_chooser: TemplateChooser | None = None  # loaded by the parent just before forking workers


def start_worker(params: Params, sources: list[Source], mappings: list[Mapping], output: IO[str] | Path) -> None:
    """Set up this process to render pieces (the HuggingFace tokenizer, if any, is loaded when first needed)."""
    global _context
    chooser = _forked_chooser if _forked_chooser is not None else TemplateChooser(params)
    _context = Context(params, sources, mappings, chooser, output)


@contextlib.contextmanager
def _tokenizer_loaded_once(params: Params, workers: int) -> Iterator[None]:
    """With worker processes to fork, load the HuggingFace tokenizer once, here, when the templates need it."""
    global _forked_chooser
    template, hf = params.render.template, params.tokenizer.tokenizer_type == "huggingface"
    if workers > 1 and (template == "tokenizer" or (template == "auto" and hf)):
        _forked_chooser = TemplateChooser(params)
        _forked_chooser.tokenizer  # loaded now: forked workers share it
    try:
        yield
    finally:
        _forked_chooser = None


def render_piece(task: tuple[int, Piece]) -> tuple[str | None, Stats, str | None]:
    """(the part file written or None, counts, error message or None) for piece number `index` of the stage."""
    index, piece = task
    ctx, stats = _context, Stats()
    try:
        if isinstance(ctx.output, Path):
            part = ctx.output / f"{index:07d}.jsonl"
            with open(part, "w", encoding="utf-8", newline="") as out:
                _render_into(out, piece, ctx, stats)
            return str(part), stats, None
        _render_into(ctx.output, piece, ctx, stats)
    except UserError as err:
        return None, stats, str(err)
    return None, stats, None


def _render_into(out: IO[str], piece: Piece, ctx: Context, stats: Stats) -> None:
    for where, item in _records(piece, ctx):
        line = render_record(where, item, piece, ctx, stats)
        if line is not None:
            out.write(line)


def _records(piece: Piece, ctx: Context) -> Iterator[tuple[Location, object]]:
    """The records of a piece; one whose messages field holds a list of conversations gives one per conversation."""
    render, mapping = ctx.params.render, ctx.mappings[piece.source]
    for where, item in read_piece(piece, render.text_split, render.records_field, max_record_bytes(render)):
        many = None if isinstance(item, RecordError) else conversation_list(item, mapping)
        if many is None:
            yield where, item
            continue
        key, conversations = many
        for i, conversation in enumerate(conversations):
            yield where._replace(conversation=i), with_field(item, key, conversation)


def _what(render: RenderParams) -> str:
    if render.sources:
        return "render.sources = " + ", ".join(repr(s.path) for s in render.sources)
    return f"render.data_path = {render.data_path!r}"


def _report(stats: Stats, sources: list[dict], out_dir: Path, input_bytes: int, seconds: float, workers: int) -> None:
    rate = f", {input_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s with {workers} process(es)" if workers > 1 else ""
    print(f"render: {stats.records_written} records, {stats.characters:,} characters from "
          f"{len(stats.formats)} file(s){rate} -> {out_dir / RECORDS_FILE}")
    if len(sources) > 1:
        for source in sources:
            role = "validation" if source["validation"] else f"weight {source['weight']:g}"
            print(f"render:   {source['path']} ({role}): {source['records']} records")
    for line in stats.warnings():
        print(f"render: note: {line}; see {out_dir / STATS_FILE}", file=sys.stderr)
    if stats.records_skipped:
        first = "; ".join(f"{_skipped_where(s)} ({s['problem']})" for s in stats.skipped[:3])
        print(f"render: skipped {stats.records_skipped} record(s), first: {first}; all counted in "
              f"{out_dir / STATS_FILE}", file=sys.stderr)


def _skipped_where(entry: dict) -> str:
    part = entry.get("conversation")
    if "record" in entry:
        return str(Location(entry["file"], index=entry["record"], conversation=part))
    if "row" in entry:
        return str(Location(entry["file"], index=entry["row"], conversation=part))
    return str(Location(entry["file"], entry.get("line"), conversation=part))


if __name__ == "__main__":
    run_stage(main)
