"""Content hashes of big input files (a pretrained model's weights), computed once and reused while unchanged.

A run that continues a pretrained model is defined by what its weight files hold, not by the folder's path: the same
folder given as a relative or an absolute path, or copied to another machine, is the same run, and new weights under the
same path are a new run. Hashing several GB takes a while, so each file's sha256 is kept in a small cache at the
project's top folder (`.stepwise-cache/hashes.json`, git-ignored; stages/lib/base/project_root.py), keyed by its
resolved path, size and modification time: a session start hashes again only what changed.
"""

import hashlib
import json
from pathlib import Path

from stages.lib.base.files import write_atomically
from stages.lib.base.project_root import at_root
from stages.lib.modeling.model_folders import check_model_folder

CACHE_FILE = Path(".stepwise-cache") / "hashes.json"
# What defines a pretrained model folder's weights: its config and weight files (not its README or tokenizer).
MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt",
               "*.pth")
BLOCK = 16 << 20


def model_digest(folder: str | Path, cache_file: Path | None = None) -> str:
    """One sha256 over the config and weight files of a model folder (names and contents), cached per file."""
    cache_file = at_root(CACHE_FILE) if cache_file is None else cache_file
    check_model_folder(str(folder))
    folder = Path(folder)
    files = sorted({f for pattern in MODEL_FILES for f in folder.glob(pattern) if f.is_file()})
    cache = _read_cache(cache_file)
    before = dict(cache)
    total = hashlib.sha256()
    for f in files:
        total.update(f"{f.name}\0{file_digest(f, cache)}\0".encode())
    if cache != before:
        _write_cache(cache_file, cache)
    return total.hexdigest()


def file_digest(path: Path, cache: dict) -> str:
    """sha256 of a file, from `cache` when its size and modification time are unchanged (the cache is updated)."""
    stat = path.stat()
    key = str(path.resolve())
    entry = cache.get(key)
    if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            digest.update(block)
    cache[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return cache[key]["sha256"]


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: hash again
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(path: Path, cache: dict) -> None:
    try:
        write_atomically(path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    except OSError:  # a read-only workspace: the hashes are only recomputed next time
        pass
