"""Reading raw data files as people have them: plain text, JSON, JSONL and Parquet, plain or compressed.

Every reader streams: memory holds a line, a JSON array element or a Parquet batch of rows, never the file. A
reader yields `(Location, item)` pairs, where the item is a document's text, a parsed JSON value or a Parquet row
(a dict), or a `RecordError` saying why that record cannot be used. Locations are what error messages and
stats.json name: `file:line` for a line, `file[i]` for element i of a JSON array (with the line it starts on) or
row i of a Parquet file, both counting from 0.

- Plain text (`.txt`): documents cut by `text_split` (paragraph | line | file); a line that is not UTF-8 is named
  by its own line number in every mode.
- JSON (`.json`, `.jsonl`): a JSON array of records, or one record per line. A file starting with `[` is a JSON
  array unless its first line is, by itself, a list of messages: then each line is a conversation. A JSON array is
  parsed element by element from a buffered stream, so a 2 GB array needs a few MB of memory.
- Parquet (`.parquet`): rows read by row group, only the columns asked for.
- Any of the text formats compressed with gzip (`.gz`) or zstd (`.zst`), decompressed as a stream.

A file is read in `Piece`s (see stages/lib/ingest/pieces.py); reading a file's pieces one after the other yields exactly
what reading the whole file yields.
"""

import codecs
import gzip
import io
import json
import re
from pathlib import Path
from typing import IO, Any, Generator, Iterator, NamedTuple

from stages.lib.base.errors import UserError

TEXT_SUFFIXES = (".txt", ".json", ".jsonl")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
BOM = b"\xef\xbb\xbf"
_CHUNK = 1 << 20  # characters of a JSON array read at a time
MAX_RECORD_BYTES = 64 << 20  # render.max_record_mb's default: a longer line or JSON element is a bad record
_SNIFF_LINE = 16 << 20  # a first line longer than this is not one conversation
_SPACE = re.compile(r"[ \t\n\r]*")
_NOT_UTF8 = re.compile("[\udc80-\udcff]")  # what undecodable bytes become under errors="surrogateescape"


class RecordError(Exception):
    """One record that cannot be rendered; skippable with render.on_error: skip."""


class Location(NamedTuple):
    """Where a record comes from: a line of a file, an element of a JSON array, or a row of a Parquet file."""

    file: str
    line: int | None = None
    index: int | None = None
    unit: str = "line"  # line | element | row
    conversation: int | None = None  # one of the conversations a record holds in a list, counting from 0

    def __str__(self) -> str:
        if self.index is not None:
            where = f"{self.file}[{self.index}]"
        else:
            where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return where if self.conversation is None else f"{where}[{self.conversation}]"

    def described(self) -> str:
        """The location as an error message names it."""
        of = "" if self.conversation is None else f" (conversation {self.conversation} of the record's list)"
        if self.unit == "element":
            return (f"{self} (element {self.index} of the JSON array, counting from 0, starting at line "
                    f"{self.line}){of}")
        if self.unit == "row":
            return f"{self} (row {self.index} of the Parquet file, counting from 0){of}"
        return f"{self}{of}"

    def as_json(self) -> dict:
        """The location as stats.json lists it."""
        if self.unit == "element":
            where = {"file": self.file, "record": self.index, "line": self.line}
        elif self.unit == "row":
            where = {"file": self.file, "row": self.index}
        else:
            where = {"file": self.file, "line": self.line}
        return where if self.conversation is None else {**where, "conversation": self.conversation}


def split_suffix(path: Path) -> tuple[str, str | None]:
    """(data suffix, compression) of a file name: `a.jsonl.zst` -> ('.jsonl', 'zstd'), `a.txt` -> ('.txt', None)."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compression


def open_binary(path: Path, raw: IO[bytes] | None = None) -> IO[bytes]:
    """The file's bytes as a stream, decompressed on the fly when its name ends in .gz or .zst.

    `raw`: the file already open (its position then tells how much of the compressed file was read).
    """
    compression = split_suffix(path)[1]
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw) if raw else gzip.open(path, "rb")
    if compression == "zstd":
        import zstandard  # only needed for .zst files

        # read_across_frames: files written by parallel compressors hold many frames; a large window for --long.
        reader = zstandard.ZstdDecompressor(max_window_size=1 << 31).stream_reader(
            raw or open(path, "rb"), read_across_frames=True, closefd=raw is None)
        return io.BufferedReader(reader, buffer_size=1 << 20)
    return raw or open(path, "rb")


def damaged(path: Path, err: Exception) -> RecordError:
    """The error for a file whose data breaks off (a cut-off download, a damaged compressed stream)."""
    suffix, compression = split_suffix(path)
    what = compression or ("Parquet" if suffix == ".parquet" else "file's")
    return RecordError(f"the {what} data is damaged or cut off ({type(err).__name__}: {err}); the rest of the file "
                       "cannot be read: download or compress it again")


# What a file's first bytes say it is: (magic, what it looks like, its suffix or '' when it cannot be read here).
_MAGIC = ((b"\x1f\x8b", "gzip data", ".gz"), (b"\x28\xb5\x2f\xfd", "zstd data", ".zst"),
          (b"BZh", "bzip2 data", ""), (b"\xfd7zXZ\x00", "xz data", ""), (b"PK\x03\x04", "a zip archive", ""),
          (b"PAR1", "a Parquet file", ".parquet"), (b"\xff\xfe", "UTF-16 text", ""), (b"\xfe\xff", "UTF-16 text", ""))


def check_content(path: Path) -> None:
    """A UserError when a file's first bytes contradict its name (a `.zst` that is plain JSONL, a `.gz` that is not
    gzip, a `.jsonl` that is compressed or UTF-16), saying what it looks like and what to rename it to."""
    suffix, compression = split_suffix(path)
    if suffix == ".parquet":
        return  # open_parquet says what is wrong
    with open(path, "rb") as f:
        head = f.read(64)
    looks, right = _looks_like(head)
    expected = {"gzip": "gzip data", "zstd": "zstd data"}.get(compression, "text")
    if looks == expected or (expected == "text" and looks in ("plain JSON", "plain text", "binary data")):
        return  # text with odd bytes is for the reader to name, at its line
    name = path.name[:-len(path.suffix)] if compression else path.name
    if looks == "an empty file":
        fix = "it holds nothing; download it again, or delete it"
    elif right in (".gz", ".zst"):
        fix = f"rename it to {name}{right}"
    elif right == ".parquet":
        fix = f"rename it to {name.rsplit('.', 1)[0]}.parquet"
    elif looks in ("plain JSON", "plain text"):
        fix = f"rename it to {name}"
    elif "UTF-" in looks:
        fix = f"convert it to UTF-8 text (iconv -f {looks.split()[0].lower()} -t utf-8)"
    elif looks == "binary data":
        fix = "check what format it is in (the `file` command tells), and download it again if it is damaged"
    else:
        fix = "unpack it into .txt, .json, .jsonl or .parquet files (optionally .gz or .zst)"
    named = f"{compression} (its name ends in {path.suffix})" if compression else f"{suffix or 'data'} text"
    raise UserError(f"{path.as_posix()}: the name says {named}, but the file looks like {looks}: {fix}")


def _looks_like(head: bytes) -> tuple[str, str]:
    """(what the first bytes of a file look like, the suffix such a file has)."""
    if (head[:4] == b"\x00\x00\xfe\xff" or head[:4] == b"\xff\xfe\x00\x00") and len(head) >= 4:
        return "UTF-32 text", ""
    for magic, looks, suffix in _MAGIC:
        if head.startswith(magic):
            return looks, suffix
    if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":  # a zstd skippable frame
        return "zstd data", ".zst"
    if not head:
        return "an empty file", ""
    if b"\x00" in head:
        return ("UTF-16 text" if head.count(b"\x00") * 3 >= len(head) else "binary data"), ""
    first = head.removeprefix(BOM).lstrip()[:1]
    return ("plain JSON" if first in (b"{", b"[") else "plain text"), ""


# ---- lines and plain text ---------------------------------------------------------------------------------------

def read_lines(stream: IO[bytes], first_line: int = 1, size: int | None = None,
               max_line: int = MAX_RECORD_BYTES) -> Iterator[tuple[int, str | RecordError]]:
    """(line number, text without its line ending) for each line of `stream`, up to `size` bytes when given.

    Line 1 loses a UTF-8 byte order mark; a line that is not UTF-8 is a RecordError naming the byte; so is a line
    longer than `max_line` bytes, which is passed over a block at a time, never held whole.
    """
    done, number = 0, first_line
    while raw := stream.readline(max_line + 1):
        if len(raw) > max_line and not raw.endswith(b"\n"):
            length = len(raw) + skip_line(stream)
            yield number, RecordError(line_too_long(max_line))
        else:
            length = len(raw)
            if number == 1:
                raw = raw.removeprefix(BOM)
            try:
                yield number, raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            except UnicodeDecodeError as err:
                yield number, RecordError(not_utf8(raw, err.start, "of the line"))
        done += length
        number += 1
        if size is not None and done >= size:
            return


def skip_line(stream: IO[bytes]) -> int:
    """Read past the rest of the current line (to just after its line end), a block at a time; the bytes read."""
    skipped = 0
    while block := stream.readline(1 << 20):
        skipped += len(block)
        if block.endswith(b"\n"):
            break
    return skipped


def line_too_long(max_line: int) -> str:
    """Why a line longer than render.max_record_mb is a bad record."""
    return (f"a line longer than render.max_record_mb = {max_line / (1 << 20):.3g} MB, which is taken for broken data "
            "(a file with no line ends, or the wrong format); split the record, or raise render.max_record_mb")


def not_utf8(raw: bytes, at: int, where: str) -> str:
    """Why bytes that are not UTF-8 cannot be read, with what the text looks like instead."""
    head = raw[at:at + 4]
    if raw.count(b"\x00") * 4 >= len(raw) > 0 or raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        looks = "the text looks like UTF-16; convert the file (iconv -f utf-16 -t utf-8) or "
    else:
        try:
            raw.decode("cp1252")
            looks = (f"the text looks like Latin-1 (Windows-1252) at byte {at + 1}; convert the file (iconv -f "
                     "latin1 -t utf-8) or ")
        except UnicodeDecodeError:
            looks = ""
    return f"bytes that are not UTF-8 at byte {at + 1} {where} ({head!r}); {looks}save the file as UTF-8"


def text_documents(lines: Iterator[tuple[int, str | RecordError]], file: str,
                   split: str) -> Iterator[tuple[Location, str | RecordError]]:
    """The documents of plain text lines, cut by `split` (paragraph | line | file).

    A document holding a line that is not UTF-8 is a RecordError located at that line, its first bad one.
    """
    if split == "line":
        for number, line in lines:
            if isinstance(line, RecordError) or line.strip():
                yield Location(file, number), line
        return
    doc: list[str] = []
    first, bad = 0, None
    for number, line in lines:
        if split == "paragraph" and not isinstance(line, RecordError) and not line.strip():
            if doc or bad:
                yield _document(file, first, doc, bad, split)
            doc, bad = [], None
            continue
        if not doc and bad is None:
            first = number
        if isinstance(line, RecordError):
            bad = bad or (number, line)
            continue
        doc.append(line)
    if bad or (doc and "".join(doc).strip()):
        yield _document(file, first, doc, bad, split)


def _document(file: str, first: int, doc: list[str], bad: tuple | None, split: str) -> tuple[Location, Any]:
    if bad:
        line, err = bad
        where = f", in the {split if split == 'paragraph' else 'document'} that starts at line {first}" \
            if line != first else ""
        return Location(file, line), RecordError(f"{err}{where}")
    text = "\n".join(doc)
    return Location(file, first), text.rstrip("\n") if split == "file" else text


# ---- JSON -------------------------------------------------------------------------------------------------------

def jsonl_records(lines: Iterator[tuple[int, str | RecordError]], file: str) -> Iterator[tuple[Location, Any]]:
    """(location, parsed value or RecordError) for each non-blank line."""
    for number, line in lines:
        if isinstance(line, RecordError):
            yield Location(file, number), line
        elif line.strip():
            try:
                yield Location(file, number), json.loads(line)
            except json.JSONDecodeError as err:
                yield Location(file, number), RecordError(f"malformed JSON ({err.msg} at column {err.colno})")
            except RecursionError:
                yield Location(file, number), RecordError(TOO_DEEP)


TOO_DEEP = ("nested deeper than the JSON parser allows (about 1,000 levels of brackets), which is taken for broken "
            "or hostile data")


def json_array_records(stream: IO[bytes], file: str, max_element: int = MAX_RECORD_BYTES,
                       records_field: str = "") -> Iterator[tuple[Location, Any]]:
    """(location, element or RecordError) for each element of the JSON array in `stream`, parsed as a stream.

    Broken JSON ends the file: the elements before it are yielded, then one RecordError for the rest.
    """
    text = _ArrayText(stream, max_element)
    if text.next_char() != "[":
        yield Location(file, text.line), RecordError("expected a JSON array starting with '['")
        return
    if (yield from _array_elements(text, file)) and text.next_char():
        yield Location(file, text.line), RecordError("there is more after the JSON array's closing ']'; a .json "
                                                     "file holds one array (or one record per line)")


class NotOneObject(Exception):
    """A file that starts with '{' but is not one JSON object: it is read as one record per line instead."""


def json_object_records(stream: IO[bytes], file: str, max_element: int = MAX_RECORD_BYTES,
                        records_field: str = "") -> Iterator[tuple[Location, Any]]:
    """The records of a file holding one JSON object: the object itself (located as the file), or with
    `records_field` each element of the list under that key (located as `file[i]`), parsed as a stream.

    Raises NotOneObject, before yielding anything, when the text is not one object (or its records list).
    """
    text = _ArrayText(stream, max_element)
    text.next_char()
    if not records_field:
        value, end = _one_value(text)
        text.advance(end)
        if text.next_char():
            raise NotOneObject
        yield Location(file), value
        return
    text.advance(text.pos + 1)
    keys = []
    while text.next_char() == '"':
        key, end = _one_value(text)
        text.advance(end)
        if text.next_char() != ":":
            raise NotOneObject
        text.advance(text.pos + 1)
        text.next_char()
        if key == records_field:
            if text.next_char() != "[":
                raise NotOneObject
            yield from _array_elements(text, file)
            return
        keys.append(key)
        text.advance(_one_value(text)[1])
        if text.next_char() == ",":
            text.advance(text.pos + 1)
    if text.next_char() != "}":
        raise NotOneObject
    named = ", ".join(f"'{k}'" for k in keys[:8]) or "none"
    yield Location(file), RecordError(f"render.records_field = {records_field!r} is not a key of the JSON object "
                                      f"(its keys: {named}); name the key that holds the list of records")


def _one_value(text: "_ArrayText") -> tuple[Any, int]:
    try:
        return text.decode()
    except (json.JSONDecodeError, RecursionError):
        raise NotOneObject from None


def _array_elements(text: "_ArrayText", file: str) -> Generator[tuple[Location, Any], None, bool]:
    """The elements of the JSON array that starts at the reading position, which ends just after it; returns
    whether the array was read to its end (else a RecordError said why not)."""
    text.advance(text.pos + 1)
    index = 0
    while True:
        char = text.next_char()
        if char == "]" and index == 0:
            text.advance(text.pos + 1)
            break
        where = Location(file, text.line, index, "element")
        try:
            value, end = text.decode()
        except (json.JSONDecodeError, RecursionError) as err:
            if isinstance(err, RecursionError):
                problem = TOO_DEEP
            elif len(text.text) - text.pos > text.max_element:
                problem = _too_long_element(text.max_element)
            else:
                line = text.line + text.text.count("\n", text.pos, max(err.pos, text.pos))
                problem = f"the JSON array does not parse ({err.msg}, line {line})"
            yield where, RecordError(f"{problem}; the elements from here to the end of the file cannot be read "
                                     "until it is fixed")
            return False
        bad = _NOT_UTF8.search(text.text, text.pos, end)
        if end - text.pos > text.max_element:
            value = RecordError(_too_long_element(text.max_element))
        elif bad:
            line = text.line + text.text.count("\n", text.pos, bad.start())
            value = RecordError(f"bytes that are not UTF-8 at line {line}; save the file as UTF-8")
        text.advance(end)
        yield where, value
        index += 1
        char = text.next_char()
        if char == ",":
            text.advance(text.pos + 1)
            continue
        if char == "]":
            text.advance(text.pos + 1)
            break
        found = f"{char!r}" if char else "the end of the file"
        yield Location(file, text.line, index, "element"), RecordError(
            f"expected ',' or ']' after element {index - 1} of the JSON array, found {found} at line {text.line}; "
            "the rest of the file cannot be read until it is fixed")
        return False
    return True


def _too_long_element(max_element: int) -> str:
    return f"an element longer than render.max_record_mb = {max_element / (1 << 20):.3g} MB"


class _ArrayText:
    """The decoded text of a stream, read a chunk at a time, with the line number of the reading position."""

    def __init__(self, stream: IO[bytes], max_element: int = MAX_RECORD_BYTES):
        self.reader = codecs.getreader("utf-8-sig")(stream, errors="surrogateescape")
        self.text, self.pos, self.line, self.eof = "", 0, 1, False
        self.max_element = max_element

    def more(self) -> None:
        """Read the next chunk (at least as much as is buffered, so a long element costs O(n log n))."""
        chunk = self.reader.read(max(_CHUNK, len(self.text) - self.pos))
        if not chunk:
            self.eof = True
        self.text = self.text[self.pos:] + chunk
        self.pos = 0

    def advance(self, to: int) -> None:
        self.line += self.text.count("\n", self.pos, to)
        self.pos = to

    def next_char(self) -> str:
        """The next character that is not JSON whitespace ('' at the end), moving up to it."""
        while True:
            self.advance(_SPACE.match(self.text, self.pos).end())
            if self.pos < len(self.text) or self.eof:
                return self.text[self.pos:self.pos + 1]
            self.more()

    def decode(self) -> tuple[Any, int]:
        """The JSON value at the reading position and where it ends, reading on while it may be cut off."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:
                    return value, end
            except json.JSONDecodeError as err:
                cut_off = err.pos >= len(self.text) - 16 or err.msg.startswith("Unterminated string")
                if self.eof or not cut_off or len(self.text) - self.pos > self.max_element:
                    raise
            self.more()


_DECODER = json.JSONDecoder()


def json_layout(stream: IO[bytes], role_keys: tuple[str, ...]) -> str:
    """How a JSON file holds its records: 'array' (a JSON array), 'object' (one JSON object) or 'jsonl'.

    The first non-blank character decides: '[' is an array, except that a first line that is by itself a JSON
    list of messages (objects with a role) makes the file one conversation per line; '{' is one record per line
    when the first line parses by itself, else one object (read as lines after all if it does not parse whole).
    """
    while raw := stream.readline(_SNIFF_LINE):
        line = raw.removeprefix(BOM).strip()
        if not line:
            continue
        if not line.startswith((b"[", b"{")):
            return "jsonl"
        try:
            first = json.loads(line)
        except RecursionError:  # nested too deep: one record per line if more lines follow, else the array
            if any(more.strip() for more in iter(lambda: stream.readline(_SNIFF_LINE), b"")):
                return "jsonl"
            return "array" if line.startswith(b"[") else "object"
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "array" if line.startswith(b"[") else "object"
        if isinstance(first, dict):
            return "jsonl"
        return "jsonl" if first and isinstance(first[0], dict) and any(k in first[0] for k in role_keys) else "array"
    return "jsonl"


# ---- Parquet ----------------------------------------------------------------------------------------------------

def parquet_rows(path: Path, file: str, row_groups: list[int], first_row: int,
                 columns: list[str]) -> Iterator[tuple[Location, Any]]:
    """(location, row as a dict of the given columns) for the rows of some row groups of a Parquet file."""
    import pyarrow as pa  # only needed for Parquet files

    row = first_row
    try:
        # No pyarrow threads: the render stage's worker processes are the parallelism.
        for batch in open_parquet(path).iter_batches(batch_size=1024, row_groups=row_groups, columns=columns,
                                                     use_threads=False):
            for record in batch.to_pylist():
                yield Location(file, index=row, unit="row"), record
                row += 1
    except (OSError, pa.ArrowException) as err:
        yield Location(file, index=row, unit="row"), damaged(path, err)


def open_parquet(path: Path) -> Any:
    """A pyarrow ParquetFile; a clear error when the file is not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"{path.as_posix()} is not a readable Parquet file ({err}); check that it downloaded "
                        "completely (a Git LFS pointer is a small text file: run `git lfs pull`)") from None
