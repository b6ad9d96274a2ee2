"""Whether DVC did record a checkpoint: its folder listed, with the same state.json, in a folder object of DVC's
cache (`.dvc/cache/files/md5/<2>/<30>.dir`, a JSON list of `{"md5", "relpath"}`, written once DVC has hashed and
cached every file of an output folder, just before it writes dvc.lock).

The train stage leaves a note naming its last checkpoint when it ends under DVC (store.note_recorded), but DVC
hashes and caches the outputs only after the stage's process has ended: a job killed in between leaves a note
naming a checkpoint DVC never recorded. The note counts only when DVC's cache confirms it. A project without a
DVC cache (the stage run by hand, or in tests) cannot be checked: there the note is taken at its word.
"""

import configparser
import hashlib
import json
from pathlib import Path

from stages.lib.base.project_root import project_root


def dvc_cache(root: Path | None = None) -> Path | None:
    """DVC's cache folder for the project (`cache.dir` of .dvc/config or config.local, else .dvc/cache); None
    when the project has no DVC folder."""
    dvc = (project_root() if root is None else Path(root)) / ".dvc"
    if not dvc.is_dir():
        return None
    folder = dvc / "cache"
    for name in ("config", "config.local"):
        config = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            config.read(dvc / name, encoding="utf-8")
        except configparser.Error:  # a file DVC reads but this parser does not: keep the default
            continue
        if config.has_option("cache", "dir"):
            folder = (dvc / config.get("cache", "dir")).resolve()
    return folder


def recorded_in_cache(checkpoint: Path, cache: Path) -> bool:
    """Whether a folder object in DVC's `cache` lists `checkpoint`'s state.json with the same content."""
    state = Path(checkpoint) / "state.json"
    try:
        digest = hashlib.md5(state.read_bytes()).hexdigest()
    except OSError:
        return False
    wanted = {"md5": digest, "relpath": f"{Path(checkpoint).name}/state.json"}
    for listing in (Path(cache) / "files" / "md5").glob("*/*.dir"):
        try:
            entries = json.loads(listing.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(entries, list) and any(isinstance(e, dict) and e.get("relpath") == wanted["relpath"]
                                             and e.get("md5") == digest for e in entries):
            return True
    return False
