"""What an export folder holds, by `train.export` (see stages/lib/export.py), told from its files alone: the
session's quick path (stages/lib/preflight.py) asks it before torch or transformers is imported."""

from pathlib import Path

ADAPTER_DIR = "adapter"  # inside the export, with train.export: both


def holds(out_dir: Path, export: str = "merged") -> bool:
    """Whether `out_dir` holds the export `export` asks for: `merged` a model (config.json), `adapter` an adapter
    (adapter_config.json) and no model, `both` a model with the adapter in ADAPTER_DIR."""
    model, adapter = (Path(out_dir) / "config.json").is_file(), (Path(out_dir) / "adapter_config.json").is_file()
    if export == "adapter":
        return adapter and not model
    return model and (export == "merged" or (Path(out_dir) / ADAPTER_DIR / "adapter_config.json").is_file())
