"""What a model folder holds, told from its files alone: the export `train.export` asks for (see
stages/lib/modeling/export.py), and a `train.init_from` that can be a base model. The session's quick path
(stages/lib/training/preflight.py) asks both before torch or transformers is imported."""

from pathlib import Path

from stages.lib.base.errors import UserError

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
