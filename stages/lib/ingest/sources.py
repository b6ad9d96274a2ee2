"""The sources the render stage reads: render.data_path, or a weighted mixture inside it, and a validation source.

`render.data_path` alone, or the sources of `render.sources`, each inside data_path (which is what DVC tracks for
the render stage: a source outside it would change without the pipeline noticing); then `render.validation_path`,
also inside data_path, whose files are never read as training data even when a source's folder holds them. How
the tokenize stage turns the mixture into training documents is in stages/lib/tokenizing/mixture.py.
"""

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from stages.lib.base.errors import UserError
from stages.lib.base.params import FieldNames, RenderParams
from stages.lib.ingest.readers import TEXT_SUFFIXES, split_suffix

DATA_SUFFIXES = TEXT_SUFFIXES + (".parquet",)  # each of TEXT_SUFFIXES also with .gz or .zst


@dataclass(frozen=True)
class Source:
    """One source: where it is, its files, its weight, and what it overrides of render's settings."""

    path: str
    files: tuple[Path, ...]
    weight: float = 1.0
    format: str = ""
    fields: FieldNames | None = None
    validation: bool = False

    def describe(self) -> dict:
        """Its entry in stats.json's `sources` (the stage adds the number of records)."""
        return {"path": self.path, "weight": self.weight, "validation": self.validation}


def sources_of(render: RenderParams) -> list["Source"]:
    """The sources render reads, in order, each with its files; the validation source (if any) last."""
    held_out = find_files(render.validation_path, "render.validation_path") if render.validation_path else []
    if render.validation_path:
        _check_inside(render.validation_path, held_out, render.data_path, "render.validation_path")
    given = render.sources or []
    sources = []
    for i, src in enumerate(given):
        key = f"render.sources[{i}].path"
        files = find_files(src.path, key)
        _check_inside(src.path, files, render.data_path, key)
        sources.append(Source(src.path, _without(files, held_out), src.weight, src.format, src.fields))
    if not given:
        sources.append(Source(render.data_path, _without(find_files(render.data_path, "render.data_path"),
                                                         held_out)))
    if render.validation_path:
        sources.append(Source(render.validation_path, tuple(held_out), validation=True))
    return sources


def find_files(data_path: str, key: str) -> list[Path]:
    """The data files a path names (a file, the data files in a folder and its subfolders, or a glob's matches), in
    sorted order; hidden files and folders (a name starting with '.') are left out."""
    path = Path(data_path)
    if path.is_dir():
        files = _data_files_under(path)
        if not files:
            raise UserError(f"{key} = {data_path!r} is a folder with no data file in it or its subfolders (.txt, "
                            ".json, .jsonl or .parquet, the text ones also as .gz or .zst)")
    elif path.is_file():
        files = [path]
    elif any(c in data_path for c in "*?["):
        files = [Path(p) for p in glob.glob(data_path, recursive=True) if Path(p).is_file()]
        if not files:
            raise UserError(f"{key} = {data_path!r} matches no file; check the pattern")
    else:
        raise UserError(f"{key} = {data_path!r} does not exist; set it to a file, a folder or a glob of your raw "
                        "data (relative to the repository root)")
    return sorted(files, key=lambda p: p.as_posix())


def _data_files_under(folder: Path) -> list[Path]:
    """The data files in a folder and its subfolders, hidden ones (.git, .cache, .DS_Store, ...) left out."""
    files = []
    for root, folders, names in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith(".")]  # not walked into at all
        files += [Path(root, name) for name in names if not name.startswith(".")]
    return [p for p in files if p.is_file() and is_data_file(p)]


def is_data_file(path: Path) -> bool:
    """Whether a file in a data folder is read: its suffix is a data format's, possibly compressed."""
    suffix, compression = split_suffix(path)
    return suffix in DATA_SUFFIXES and not (compression and suffix == ".parquet")


def _check_inside(given: str, files: list[Path], data_path: str, key: str) -> None:
    root = Path(data_path).resolve()
    for f in files:
        if not f.resolve().is_relative_to(root):
            raise UserError(f"{key} = {given!r} is outside render.data_path = {data_path!r}: DVC tracks data_path "
                            "for the render stage, so changes to this file would go unnoticed. Put it inside "
                            "data_path, or set data_path to a folder that holds all the sources")


def _without(files: list[Path], held_out: list[Path]) -> tuple[Path, ...]:
    held = {f.resolve() for f in held_out}
    return tuple(f for f in files if f.resolve() not in held)
