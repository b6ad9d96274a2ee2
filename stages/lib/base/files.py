"""Writing files and folders safely: complete or absent, always new files, durable once published.

Every stage writes its outputs through these few functions. A file is written under a temporary name beside its
final path, fsynced, then renamed over it (`os.replace`), and the folder holding it is fsynced so the rename itself
survives a power cut. A file is never rewritten in place: DVC's cache may be hardlinked to the old one, and writing
into it would corrupt the cache. A folder is built under a temporary name and swapped in whole the same way.
"""

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Iterator

from stages.lib.base.errors import UserError

PARTIAL = ".partial"  # suffix of a file or folder being built
OLD = ".old"  # suffix of the folder a swap is replacing


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8, newlines as given) to `path` as a new file, durably."""
    with replaced_file(path, binary=isinstance(data, bytes)) as f:
        f.write(data)


@contextlib.contextmanager
def replaced_file(path: str | Path, binary: bool = False) -> Iterator[IO]:
    """A file object writing a new file that replaces `path` when the block succeeds; on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}{PARTIAL}")
    try:
        with open(partial, "wb") if binary else open(partial, "w", encoding="utf-8", newline="") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
        fsync_folder(path.parent)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def replaced_folder(final: str | Path) -> Iterator[Path]:
    """An empty folder to fill; when the block succeeds it replaces `final` whole, on error it is removed."""
    final = Path(final)
    partial = fresh_folder(final.with_name(f".{final.name}{PARTIAL}"))  # a crashed run's leftover goes first
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish_folder(partial, final)


def publish_folder(built: Path, final: Path) -> None:
    """Make the finished folder `built` appear as `final`, durably: its files fsynced, then one rename.

    An existing `final` is first moved aside and deleted after the rename, so at every moment either the old or the
    new folder is complete (a crash between the two renames leaves the old one as `.<name>.old`).
    """
    for f in sorted(built.rglob("*")):
        if f.is_file():
            _fsync(f)
    fsync_folder(built)
    old = final.with_name(f".{final.name}{OLD}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(built, final)
    fsync_folder(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def fresh_folder(path: Path) -> Path:
    """`path` as a new empty folder (whatever was there is removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def fsync_folder(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened, as on Windows)."""
    if os.name != "nt":
        _fsync(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(path: Path, holder: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` for the block; a UserError at once when another process holds it.

    The kernel's lock (flock) is released when its process dies, however it dies, so a lock is never stale; the
    file also names the process that holds it, for the message, and a name left by a process that is gone is only
    reported ("taken over"). The file is emptied, not deleted, on release: deleting it could let two processes lock
    two different files of the same name.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{path} is held by {_describe_holder(fd)}, {holder}: only one may run at a time. Wait "
                            "for it to finish, or stop it (a SIGTERM saves a checkpoint first)") from None
        left = _read_holder(fd)
        if left:
            print(f"note: took over {path}, left by {_describe(left)}, which is no longer running")
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        _write_holder(fd, {"pid": os.getpid(), "host": socket.gethostname(), "since": since})
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing releases the lock


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        holder = json.loads(os.read(fd, 4096).decode("utf-8") or "null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _write_holder(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode("utf-8"))
    os.fsync(fd)


def _describe_holder(fd: int) -> str:
    holder = _read_holder(fd)
    return _describe(holder) if holder else "another process"


def _describe(holder: dict) -> str:
    return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('since')})"
def folder_size(path: str | Path) -> int:
    """Bytes in the files under `path` (0 when it does not exist)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else 0
