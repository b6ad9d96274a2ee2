"""Loading a local HuggingFace tokenizer folder, with messages for people when it cannot be loaded.

The tokenizer stage and the render stage (for a chat template) load `tokenizer.tokenizer_path` through here, so a
folder that is missing, empty, made of Git LFS pointers or holding a `tokenizer.json` the installed `tokenizers`
cannot read gets one message: the file, what could not be read in plain words, and what to do.
"""

import json
from pathlib import Path
from typing import Any

from stages.lib.base.errors import UserError

KEY = "tokenizer.tokenizer_path"
# Files by which a folder is recognisably a HuggingFace tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "tokenizer.model",
                   "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "special_tokens_map.json")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def load_tokenizer_folder(path: Path, trust_remote_code: bool) -> Any:
    """AutoTokenizer.from_pretrained on a local folder; a UserError saying what is wrong when it cannot."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{KEY} = '{path}' is not a folder. Hub ids need network: download the tokenizer files into "
                        f"a folder first (e.g. `hf download <id> --local-dir <folder>` where there is network) and "
                        f"set {KEY} to that folder")
    if not path.is_dir():
        raise UserError(f"{KEY} = '{path}' is a file; set it to the folder that holds it")
    present = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        found = ", ".join(sorted(p.name for p in path.iterdir())[:10]) or "nothing"
        raise UserError(f"{KEY} = '{path}' holds no tokenizer files (expected tokenizer.json or "
                        f"tokenizer_config.json; found {found})")
    pointers = [p.name for p in present if _is_lfs_pointer(p)]
    if pointers:
        raise UserError(f"{KEY} = '{path}': {', '.join(pointers)} hold Git LFS pointers, not the files themselves "
                        "(the repository was cloned without Git LFS): run `git lfs pull` in that repository, or "
                        "download the files again")
    from transformers import AutoTokenizer  # slow import: only once the folder looks right

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as err:  # transformers raises many kinds; all mean the same to the user
        raise UserError(unloadable(path, err)) from None


def unloadable(path: Path, err: Exception) -> str:
    """The message for a tokenizer folder that transformers could not load with error `err`."""
    tokenizer_json = path / "tokenizer.json"
    problem = tokenizer_json_problem(tokenizer_json) if tokenizer_json.is_file() else None
    if problem is None:
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        return (f"{KEY} = '{path}': transformers could not load the tokenizer ({type(err).__name__}: {detail}). "
                "Check that the folder holds a complete tokenizer saved by save_pretrained, and that "
                "tokenizer.trust_remote_code is true if the tokenizer needs its own code")
    import tokenizers

    others = [name for name in ("tokenizer.model", "vocab.json", "spiece.model") if (path / name).is_file()]
    other = (f"remove or rename tokenizer.json so that the model's other tokenizer files ({', '.join(others)}) "
             "are used instead" if others else "use the model's other tokenizer files (tokenizer.model) instead "
             "of tokenizer.json")
    return (f"{tokenizer_json} cannot be read by the installed tokenizers {tokenizers.__version__}: {problem}. "
            "To fix it, re-save the tokenizer with a current transformers where it loads (for instance in an "
            "environment with the versions that wrote it: AutoTokenizer.from_pretrained(folder)"
            f".save_pretrained(folder) writes today's format), or {other}")


def tokenizer_json_problem(path: Path) -> str | None:
    """What is wrong with a tokenizer.json in plain words, or None when `tokenizers` reads it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return "it is not UTF-8 text"
    except json.JSONDecodeError as err:
        return f"it is not valid JSON ({err.msg} at line {err.lineno}); the file is damaged or cut off"
    merges = data.get("model", {}).get("merges") if isinstance(data, dict) else None
    for i, merge in enumerate(merges if isinstance(merges, list) else []):
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2:
            return (f"its merges are in an old form: merge {i} is {merge!r}, which {_parts(parts)} where a merge "
                    "is a pair of tokens (a token holding a space cannot be written as one string)")
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(path))
    except Exception as err:  # the library's own message, reduced to its first line
        return "the tokenizers library rejects it: " + (str(err).strip().splitlines() or [""])[0][:200]
    return None


def _parts(parts: Any) -> str:
    if isinstance(parts, list):
        return f"splits into {len(parts)} parts"
    return f"is {type(parts).__name__}"


def _is_lfs_pointer(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(_LFS_POINTER)) == _LFS_POINTER


def tokenizer_facts(tokenizer_dir: Path, trust_remote_code: bool, meta: dict) -> tuple[int, dict]:
    """The model's vocabulary size and the tokenizer's special token ids (the train and reference stages build the
    same model from them)."""
    if not Path(tokenizer_dir).is_dir():
        raise UserError(f"{tokenizer_dir} not found: run the tokenizer stage first (dvc repro tokenizer)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    return max(len(tokenizer), meta["vocab_size"]), special
