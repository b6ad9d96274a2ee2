"""Pieces of work for the render stage: each input file cut into parts that worker processes read on their own.

A piece is a byte range of an uncompressed line-based file (cut at the start of a line, or of a blank line for
paragraphs, and knowing the number of its first line), a run of Parquet row groups, or a whole file (JSON arrays,
text read as one document per file). A compressed line-based file is decompressed by the stage itself and cut the
same way as it is read (`expanded`): its pieces carry their bytes. Pieces are cut from the files alone, never by
the number of workers, and the stage writes their output in order, so the result is the same with one process or
many.
"""

import io
import re
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from stages.lib.ingest.readers import (
    Location,
    RecordError,
    damaged,
    json_array_records,
    jsonl_records,
    open_binary,
    open_parquet,
    parquet_rows,
    read_lines,
    split_suffix,
    starts_as_array,
    text_documents,
)

PIECE_BYTES = 16 << 20  # input bytes per piece: small enough to share a file among workers, large enough to pay
_COUNT_BLOCK = 16 << 20
_BLANK_LINE = re.compile(rb"\n[ \t\r\x0b\x0c]*\n")  # the line ending before a blank line, and the blank line


@dataclass(frozen=True)
class Piece:
    """A part of one input file, and what is known about the whole file."""

    path: str
    source: int  # index of the source it belongs to
    layout: str  # text | jsonl | array | parquet
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


def file_layout(path: Path, forced_text: bool, role_keys: tuple[str, ...]) -> str:
    """How a file is read: text, jsonl, array or parquet (`forced_text`: render.format text on a JSON file)."""
    suffix = split_suffix(path)[0]
    if suffix == ".parquet":
        return "parquet"
    if suffix == ".txt" or forced_text:
        return "text"
    with open_binary(path) as stream:
        try:
            return "array" if starts_as_array(stream, role_keys) else "jsonl"
        except _stream_errors(path):
            return "jsonl"  # read as lines, so the damage is reported where it is


def plan_file(path: Path, source: int, layout: str, kind: str, split: str, piece_bytes: int = PIECE_BYTES,
              columns: tuple[str, ...] = ()) -> list[Piece]:
    """The pieces of one file, in order."""
    file, size = path.as_posix(), path.stat().st_size
    if layout == "parquet":
        return _parquet_pieces(path, source, kind, piece_bytes, columns)
    if layout == "array" or (layout == "text" and split == "file"):
        return [Piece(file, source, layout, kind, input_bytes=size)]
    if split_suffix(path)[1]:
        return [Piece(file, source, layout, kind, input_bytes=size, streamed=True)]
    cuts = _line_cuts(path, piece_bytes, paragraphs=layout == "text" and split == "paragraph")
    ends = [start for start, _ in cuts[1:]] + [size]
    return [Piece(file, source, layout, kind, start, end - start, first, input_bytes=end - start)
            for (start, first), end in zip(cuts, ends)]


def read_piece(piece: Piece, split: str) -> Iterator[tuple[Location, Any]]:
    """(location, item) for every record of the piece: text, a parsed JSON value or a row, or a RecordError."""
    path = Path(piece.path)
    if piece.layout == "parquet":
        yield from parquet_rows(path, piece.path, list(piece.row_groups), piece.first_row, list(piece.columns))
        return
    with open_binary(path) if piece.data is None else io.BytesIO(piece.data) as stream:
        if piece.start:
            stream.seek(piece.start)
        try:
            if piece.layout == "array":
                yield from json_array_records(stream, piece.path)
                return
            lines = read_lines(stream, piece.first_line, piece.size)
            if piece.layout == "text":
                yield from text_documents(lines, piece.path, split)
            else:
                yield from jsonl_records(lines, piece.path)
        except _stream_errors(path) as err:
            yield Location(piece.path), damaged(path, err)
    if piece.damage:
        yield Location(piece.path), RecordError(piece.damage)


def expanded(pieces: Iterable[Piece], split: str, piece_bytes: int = PIECE_BYTES) -> Iterator[Piece]:
    """The pieces, each streamed one cut here into pieces of about piece_bytes of its decompressed lines."""
    for piece in pieces:
        if piece.streamed:
            yield from _cut_stream(piece, paragraphs=piece.layout == "text" and split == "paragraph",
                                   piece_bytes=piece_bytes)
        else:
            yield piece


def _cut_stream(piece: Piece, paragraphs: bool, piece_bytes: int) -> Iterator[Piece]:
    """Pieces of a compressed file, each cut at the first line start (a blank line's for paragraphs) after
    piece_bytes; the last one also says what broke off the decompression, if something did."""
    path, line, data, consumed, damage = Path(piece.path), piece.first_line, bytearray(), 0, ""
    with open(path, "rb") as raw, open_binary(path, raw) as stream:
        try:
            # read1: whatever is decompressed so far, so a file that breaks off loses nothing before the break
            while block := stream.read1(1 << 20):
                data += block
                while len(data) >= piece_bytes and (cut := _first_cut(data, piece_bytes, paragraphs)) > 0:
                    yield replace(piece, streamed=False, data=bytes(data[:cut]), first_line=line,
                                  input_bytes=raw.tell() - consumed)
                    line, consumed = line + data.count(b"\n", 0, cut), raw.tell()
                    del data[:cut]
        except _stream_errors(path) as err:
            damage = str(damaged(path, err))
    if data or damage:
        yield replace(piece, streamed=False, data=bytes(data), first_line=line, damage=damage,
                      input_bytes=piece.input_bytes - consumed)


def _first_cut(data: bytearray, at: int, paragraphs: bool) -> int:
    """The first line start after byte `at` (for paragraphs: the first blank line's), or -1."""
    if not paragraphs:
        return data.find(b"\n", at - 1) + 1 or -1
    blank = _BLANK_LINE.search(data, max(0, at - 1))
    return blank.start() + 1 if blank else -1


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
            f.readline()  # on to the start of the next line
            at = f.tell()
            if paragraphs:  # on to the start of the next blank line, where no paragraph can continue
                while (raw := f.readline()) and raw.strip():
                    at += len(raw)
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
