"""Pieces of work for the render stage: each input file cut into parts that worker processes read on their own.

A piece is a byte range of an uncompressed line-based file (cut at the start of a line, or of a blank line for
paragraphs, and knowing the number of its first line), a run of Parquet row groups, or a whole file (JSON arrays
and objects, text read as one document per file). A compressed line-based file is decompressed by the stage itself
and cut the same way as it is read (`expanded`): its pieces carry their bytes. Pieces are cut from the files alone,
never by the number of workers, and the stage writes their output in order, so the result is the same with one
process or many.

Every cut is found in one pass over the bytes. A paragraph with no blank line within another piece's worth of
bytes after the piece's size is cut at a line end (so it becomes two documents): a piece holds at most twice the
piece size, plus one line, and a line longer than render.max_record_mb is passed over (a bad record), never held.
"""

import io
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from stages.lib.ingest.readers import (
    MAX_RECORD_BYTES,
    Location,
    NotOneObject,
    RecordError,
    damaged,
    json_array_records,
    json_layout,
    json_object_records,
    jsonl_records,
    line_too_long,
    open_binary,
    open_parquet,
    parquet_rows,
    read_lines,
    skip_line,
    split_suffix,
    text_documents,
)

PIECE_BYTES = 16 << 20  # input bytes per piece: small enough to share a file among workers, large enough to pay
_COUNT_BLOCK = 16 << 20
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")  # the line ending before a blank line, and the blank line
_SPACES = re.compile(rb"[ \t\r\x0b\x0c]*")


@dataclass(frozen=True)
class Piece:
    """A part of one input file, and what is known about the whole file."""

    path: str
    source: int  # index of the source it belongs to
    layout: str  # text | jsonl | array | object | parquet
    kind: str  # text | instruction | chat (the file's, decided from its first usable record) | empty
    start: int = 0  # first byte (line-based files)
    size: int | None = None  # bytes to read; None: to the end
    first_line: int = 1
    row_groups: tuple[int, ...] = ()  # Parquet
    first_row: int = 0
    columns: tuple[str, ...] = ()  # Parquet: the columns read
    dropped: tuple[str, ...] = ()  # Parquet: the columns nothing reads (counted as dropped fields)
    input_bytes: int = 0  # about how much of the file it covers, for progress
    streamed: bool = False  # a compressed line-based file, to be cut by `expanded` as it is decompressed
    data: bytes | None = None  # the piece's own (decompressed) bytes, when `expanded` cut it
    damage: str = ""  # what broke off the decompression after `data`
    long_line: int = 0  # the number of a line longer than render.max_record_mb that `expanded` passed over after it


def file_layout(path: Path, forced_text: bool, role_keys: tuple[str, ...]) -> str:
    """How a file is read: text, jsonl, array, object or parquet (`forced_text`: render.format text on a JSON file)."""
    suffix = split_suffix(path)[0]
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".txt" or forced_text:
        return "text"
    with open_binary(path) as stream:
        try:
            return json_layout(stream, role_keys)
        except _stream_errors(path):
            return "jsonl"  # read as lines, so the damage is reported where it is


def plan_file(path: Path, source: int, layout: str, kind: str, split: str, piece_bytes: int = PIECE_BYTES,
              columns: tuple[str, ...] = ()) -> list[Piece]:
    """The pieces of one file, in order."""
    file, size = path.as_posix(), path.stat().st_size
    if layout == "parquet":
        return _parquet_pieces(path, source, kind, piece_bytes, columns)
    if layout in ("array", "object") or (layout == "text" and split == "file"):
        return [Piece(file, source, layout, kind, input_bytes=size)]
    if split_suffix(path)[1]:
        return [Piece(file, source, layout, kind, input_bytes=size, streamed=True)]
    cuts = _line_cuts(path, piece_bytes, paragraphs=layout == "text" and split == "paragraph")
    ends = [start for start, _ in cuts[1:]] + [size]
    return [Piece(file, source, layout, kind, start, end - start, first, input_bytes=end - start)
            for (start, first), end in zip(cuts, ends)]


def read_piece(piece: Piece, split: str, records_field: str = "",
               max_record: int = MAX_RECORD_BYTES) -> Iterator[tuple[Location, Any]]:
    """(location, item) for every record of the piece: text, a parsed JSON value or a row, or a RecordError.

    `records_field`: the key of a JSON object file's list of records; `max_record`: the longest line or JSON
    array element read, in bytes (a longer one is a bad record).
    """
    path = Path(piece.path)
    if piece.layout == "parquet":
        yield from parquet_rows(path, piece.path, list(piece.row_groups), piece.first_row, list(piece.columns))
        return
    if piece.layout == "object":
        try:
            yield from _object_records(piece, records_field, max_record)
            return
        except NotOneObject:  # not one object after all: read as one record per line, reporting the bad lines
            piece = replace(piece, layout="jsonl")
    with open_binary(path) if piece.data is None else io.BytesIO(piece.data) as stream:
        if piece.start:
            stream.seek(piece.start)
        try:
            if piece.layout == "array":
                yield from json_array_records(stream, piece.path, max_record)
                return
            lines = read_lines(stream, piece.first_line, piece.size, max_record)
            if piece.layout == "text":
                yield from text_documents(lines, piece.path, split)
            else:
                yield from jsonl_records(lines, piece.path)
        except _stream_errors(path) as err:
            yield Location(piece.path), damaged(path, err)
    if piece.long_line:
        yield Location(piece.path, piece.long_line), RecordError(line_too_long(max_record))
    if piece.damage:
        yield Location(piece.path), RecordError(piece.damage)


def _object_records(piece: Piece, records_field: str, max_record: int) -> Iterator[tuple[Location, Any]]:
    """The records of a JSON object file; NotOneObject (before any record) when it is not one object."""
    path = Path(piece.path)
    with open_binary(path) as stream:
        records, started = json_object_records(stream, piece.path, max_record, records_field), False
        try:
            for record in records:
                started = True
                yield record
        except _stream_errors(path) as err:
            if not started:
                raise NotOneObject from None  # read as lines, so the damage is reported where it is
            yield Location(piece.path), damaged(path, err)


def expanded(pieces: Iterable[Piece], split: str, piece_bytes: int = PIECE_BYTES,
             max_line: int = MAX_RECORD_BYTES) -> Iterator[Piece]:
    """The pieces, each streamed one cut here into pieces of about piece_bytes of its decompressed lines."""
    for piece in pieces:
        if piece.streamed:
            yield from _cut_stream(piece, paragraphs=piece.layout == "text" and split == "paragraph",
                                   piece_bytes=piece_bytes, max_line=max_line)
        else:
            yield piece


def _cut_stream(piece: Piece, paragraphs: bool, piece_bytes: int, max_line: int) -> Iterator[Piece]:
    """Pieces of a compressed file, each cut at the first line start (a blank line's for paragraphs) after
    piece_bytes; the last one also says what broke off the decompression, if something did. A line longer than
    max_line ends a piece and is passed over."""
    path, line, data, consumed, damage = Path(piece.path), piece.first_line, bytearray(), 0, ""
    cuts, last_end = _Cuts(piece_bytes, paragraphs), -1  # last_end: where the last line end in `data` is
    with open(path, "rb") as raw, open_binary(path, raw) as stream:
        try:
            # read1: whatever is decompressed so far, so a file that breaks off loses nothing before the break
            while block := stream.read1(1 << 20):
                data += block
                if (end := block.rfind(b"\n")) >= 0:
                    last_end = len(data) - len(block) + end
                while (cut := cuts.find(data)) > 0:
                    yield replace(piece, streamed=False, data=bytes(data[:cut]), first_line=line,
                                  input_bytes=raw.tell() - consumed)
                    line, consumed, last_end = line + data.count(b"\n", 0, cut), raw.tell(), last_end - cut
                    del data[:cut]
                if len(data) - last_end - 1 > max_line:  # the last line is too long to hold: pass over it
                    long_line = line + data.count(b"\n", 0, last_end + 1)
                    yield replace(piece, streamed=False, data=bytes(data[:last_end + 1]), first_line=line,
                                  input_bytes=raw.tell() - consumed, long_line=long_line)
                    data = bytearray(_rest_after_line(stream))
                    line, consumed, last_end = long_line + 1, raw.tell(), data.rfind(b"\n")
                    cuts = _Cuts(piece_bytes, paragraphs)
        except _stream_errors(path) as err:
            damage = str(damaged(path, err))
    if data or damage:
        yield replace(piece, streamed=False, data=bytes(data), first_line=line, damage=damage,
                      input_bytes=piece.input_bytes - consumed)


def _rest_after_line(stream: Any) -> bytes:
    """What follows the end of the current line in the block read after it (the line itself is passed over)."""
    skip_line(stream)
    return stream.read1(1 << 20)


class _Cuts:
    """Finds where the next piece ends in a growing buffer, looking at each byte a bounded number of times.

    The cut is the first line start after piece_bytes (for paragraphs, the first blank line's); a paragraph with
    no blank line before twice piece_bytes is cut at the last line start before that, or the first one after.
    """

    def __init__(self, piece_bytes: int, paragraphs: bool):
        self.size, self.paragraphs, self.resume = piece_bytes, paragraphs, piece_bytes - 1

    def find(self, data: bytearray) -> int:
        """Where to cut `data` (the start of a line), or -1 to read on; after a cut, data starts anew."""
        if len(data) < self.size:
            return -1
        if self.paragraphs and self.resume < 2 * self.size:
            bound = min(len(data), 2 * self.size)
            blank = _BLANK_LINE.search(data, self.resume, bound)
            if blank:
                return self._cut(blank.start() + 1)
            if len(data) < 2 * self.size:
                # a blank line still to come starts at the last line end read, if only spaces follow it
                last = data.rfind(b"\n", self.resume, bound)
                spaces = _SPACES.match(data, last + 1, bound).end() if last >= 0 else -1
                self.resume = last if spaces == bound else bound
                return -1
            before = data.rfind(b"\n", 0, 2 * self.size)
            if before >= 0:
                return self._cut(before + 1)
            self.resume = 2 * self.size
        end = data.find(b"\n", self.resume)
        if end < 0:
            self.resume = max(self.resume, len(data))
            return -1
        return self._cut(end + 1)

    def _cut(self, at: int) -> int:
        self.resume = self.size - 1
        return at


def _stream_errors(path: Path) -> tuple[type, ...]:
    """What reading a (compressed) stream raises when the file is damaged."""
    if split_suffix(path)[1] == "zstd":
        import zstandard

        return OSError, EOFError, zstandard.ZstdError
    return OSError, EOFError, zlib.error


def _line_cuts(path: Path, piece_bytes: int, paragraphs: bool) -> list[tuple[int, int]]:
    """(first byte, first line number) of each piece of a line-based file; with `paragraphs`, cut at blank lines."""
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        target = piece_bytes
        while target < size:
            f.seek(target)
            skip_line(f)  # on to the start of the next line
            at = f.tell()
            if paragraphs:  # on to the start of the next blank line, where no paragraph can continue
                bound = cuts[-1] + 2 * piece_bytes  # or the last line start before it, for a paragraph going on
                while (raw := f.readline(1 << 20)) and raw.strip():
                    length = len(raw) + (0 if raw.endswith(b"\n") else skip_line(f))
                    if at + length > bound:
                        break
                    at += length
            if at >= size:
                break
            cuts.append(at)
            target = at + piece_bytes
    return list(zip(cuts, _line_numbers(path, cuts)))


def _line_numbers(path: Path, offsets: list[int]) -> list[int]:
    """The line number at each of the increasing byte `offsets`, counted in one pass."""
    numbers, line, at = [], 1, 0
    with open(path, "rb") as f:
        for offset in offsets:
            while at < offset:
                block = f.read(min(_COUNT_BLOCK, offset - at))
                line += block.count(b"\n")
                at += len(block)
            numbers.append(line)
    return numbers


def _parquet_pieces(path: Path, source: int, kind: str, piece_bytes: int, columns: tuple[str, ...]) -> list[Piece]:
    """Runs of row groups of about piece_bytes each (by their uncompressed size)."""
    parquet = open_parquet(path)
    names = tuple(parquet.schema_arrow.names)
    read = tuple(c for c in names if c in columns)
    dropped = tuple(c for c in names if c not in columns)
    pieces, groups, nbytes, first_row, row = [], [], 0, 0, 0
    meta = parquet.metadata
    share = path.stat().st_size / max(1, sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)))
    for i in range(meta.num_row_groups):
        groups.append(i)
        nbytes += meta.row_group(i).total_byte_size
        row += meta.row_group(i).num_rows
        if nbytes >= piece_bytes or i == meta.num_row_groups - 1:
            pieces.append(Piece(path.as_posix(), source, "parquet", kind, row_groups=tuple(groups),
                                first_row=first_row, columns=read, dropped=dropped, input_bytes=int(nbytes * share)))
            groups, nbytes, first_row = [], 0, row
    return pieces or [Piece(path.as_posix(), source, "parquet", "empty", columns=read, dropped=dropped)]
