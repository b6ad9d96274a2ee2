"""What a model folder holds, told from its files alone: the export `train.export` asks for (see
stages/lib/modeling/export.py), and a `train.init_from` that can be a base model. The session's quick path
(stages/lib/training/preflight.py) asks both before torch or transformers is imported."""

import json
import struct
from pathlib import Path

from stages.lib.base.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"

ADAPTER_DIR = "adapter"  # inside the export, with train.export: both


def holds(out_dir: Path, export: str = "merged") -> bool:
    """Whether `out_dir` holds the export `export` asks for: `merged` a model (config.json), `adapter` an adapter
    (adapter_config.json) and no model, `both` a model with the adapter in ADAPTER_DIR."""
    model, adapter = (Path(out_dir) / "config.json").is_file(), (Path(out_dir) / "adapter_config.json").is_file()
    if export == "adapter":
        return adapter and not model
    return model and (export == "merged" or (Path(out_dir) / ADAPTER_DIR / "adapter_config.json").is_file())


def check_model_folder(folder: str) -> None:
    """A UserError unless `folder` holds a HuggingFace model's config.json (train.init_from)."""
    if (Path(folder) / "adapter_config.json").is_file() and not (Path(folder) / "config.json").is_file():
        raise UserError(f"train.init_from = {folder!r} holds a LoRA adapter, not a model: point it at a merged "
                        "model (train.export: merged or both writes one), or at the adapter's base model (its "
                        "adapter_config.json names it) to train a new LoRA")
    if not (Path(folder) / "config.json").is_file():
        raise UserError(f"train.init_from = {folder!r}: no config.json there; expected a local HuggingFace model "
                        "folder (with config.json and model.safetensors)")


def tensor_names_in_files(folder: str) -> set[str] | None:
    """The tensor names a model folder's safetensors files hold, read from their headers alone (no weight is
    loaded); None when its weights are in another format. A UserError when a shard its index names is missing, or
    a file is cut short or is no safetensors file."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(f"{index}: not a safetensors index ({err}); download the base again") from None
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise UserError(f"train.init_from = {str(folder)!r}: {SAFETENSORS_INDEX} names {len(shards)} weight "
                            f"files and {len(missing)} of them are missing: {', '.join(missing)}. Download the base "
                            "again (an interrupted download leaves shards out)")
        files = [folder / name for name in shards]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        return None
    return {name for file in files for name in _header_names(file)}


def _header_names(file: Path) -> list[str]:
    """The tensor names in a safetensors file's header, after checking that the file holds every byte its header
    promises (a copy or download cut short does not)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length)) if 8 + length <= size else None
    except (struct.error, ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise UserError(f"{file}: not a readable safetensors file (its header is damaged or cut short); download "
                        "or export the base again")
    tensors = {name: info for name, info in header.items() if name != "__metadata__"}
    end = max((info["data_offsets"][1] for info in tensors.values()), default=0)
    if 8 + length + end > size:
        raise UserError(f"{file} is cut short: {size:,} bytes where its header describes {8 + length + end:,}; "
                        "download or export the base again")
    return list(tensors)
