"""Memory plan command: what a training session would need, from a model's config alone, and what would fit.

    python -m stages.memory_plan                         # the session params.yaml describes, on this machine
    python -m stages.memory_plan --config path/to/phi-2 --seq-len 2048 --batch-size 4 --precision fp16 --gib 15
    python -m stages.memory_plan --config path/to/phi-2 --precision fp16 --gib 15 --lora-r 16 --activation-checkpointing
    python -m stages.memory_plan --config path/to/Llama-3.1-8B --gib 15 --lora-r 16 --quantize nf4   # QLoRA on a T4

It prints the plan the train stage prints before its first step (stages/lib/modeling/memory.py) and, when the plan does
not fit, the settings that would. Nothing is loaded: the model is built on PyTorch's meta device from its config.json.
`--gib` plans for a device of that much free memory (a 15 GiB T4, say) instead of this machine's.
"""

import argparse
from dataclasses import replace
from pathlib import Path

from transformers import AutoConfig

from stages.lib.base.devices import pick_device
from stages.lib.base.errors import UserError, run_stage
from stages.lib.base.params import TOKENIZER_DIR, TrainParams, load_params
from stages.lib.modeling import lora, memory
from stages.lib.modeling.families import model_config
from stages.lib.modeling.precision import pick_precision


def main(argv: list[str] | None = None) -> None:
    """Print the memory plan for the arguments (without --config: the session params.yaml describes)."""
    args = _parser().parse_args(argv)
    train = load_params().train if args.config is None else None
    vocab_size = _tokenizer_size(train.init_from) if train else 0
    config = _config(args.config) if args.config else model_config(train, vocab_size, {})
    shape = memory.model_shape(config)
    device = pick_device(train.device if train else "auto")
    setup = memory.Setup(
        batch_size=args.batch_size or (train.batch_size if train else 1),
        seq_len=args.seq_len or (train.seq_len if train else min(2048, config.max_position_embeddings)),
        grad_accum=args.grad_accum or (train.grad_accum if train else 1),
        precision=args.precision or ("fp16" if args.gib and not train else  # another device: a GPU's 16 bits
                                     pick_precision(train.precision if train else "auto", device, warn=False).name),
        activation_checkpointing=args.activation_checkpointing or bool(train and train.activation_checkpointing),
        **_lora_settings(args.lora_r, train, vocab_size, shape))
    setup = replace(setup, **_other_settings(args, train, setup))
    free = int(args.gib * memory.GIB) if args.gib else memory.available_memory(device)
    where = f"a {args.gib:g} GiB device" if args.gib else str(device)
    plan = memory.plan_memory(shape, setup, free, where)
    print("\n".join(plan.lines()))
    if not plan.fits():
        print(memory.does_not_fit_message(plan))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a model folder or its config.json; without it, the session params.yaml "
                                         "describes (train.init_from, or a new model from train.model) and its "
                                         "settings are the defaults below")
    parser.add_argument("--seq-len", type=int, help="tokens per window (with --config: 2048 or the model's context)")
    parser.add_argument("--batch-size", type=int, help="windows per micro-batch (with --config: 1)")
    parser.add_argument("--grad-accum", type=int, help="micro-batches per step (with --config: 1)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="what the passes compute in (default: what `auto` picks on this machine; with --config "
                             "and --gib, fp16, as on a T4 or V100: bf16 on an A100 or H100 takes the same memory)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--lora-r", type=int, help="plan LoRA adapters of this rank on the frozen base, on its "
                                                   "attention and MLP projections (default: train.lora.r, or 0 "
                                                   "with --config)")
    parser.add_argument("--quantize", choices=("none", "nf4"),
                        help="hold the LoRA's frozen base in 4 bits (QLoRA; default: train.lora.quantize, or none "
                             "with --config); with it, --activation-checkpointing is on unless --no-checkpointing")
    parser.add_argument("--optimizer", choices=("adamw", "adamw8bit"),
                        help="AdamW's moments in fp32 or in 8 bits (default: train.optimizer, or adamw)")
    parser.add_argument("--train-embeddings", action="store_true",
                        help="with a LoRA: the embeddings and head train too (train.lora.train_embeddings)")
    parser.add_argument("--packing", choices=("stream", "documents"),
                        help="documents: packed documents, whose attention mask sdpa keeps per layer (default: "
                             "train.packing when it says documents, else stream)")
    parser.add_argument("--no-checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gib", type=float, help="free device memory to plan against, in GiB (default: this "
                                                  "machine's free GPU memory, or its available RAM)")
    return parser


def _lora_settings(lora_r: int | None, train: TrainParams | None, vocab_size: int, shape) -> dict:
    """The plan's LoRA: train.lora's (its rank replaced by --lora-r when given); from a config alone, --lora-r's on
    the attention and MLP projections, with dropout."""
    if train is None or not train.init_from:
        dropout = train.lora.dropout > 0 if train else True
        r = lora_r if lora_r is not None else (train.lora.r if train else 0)
        return {"lora_r": r, "lora_dropout": dropout} if r else {}
    wanted = replace(train, lora=replace(train.lora, r=lora_r)) if lora_r is not None else train
    return lora.checked_plan_settings(wanted, vocab_size, shape)


def _other_settings(args, train: TrainParams | None, setup: memory.Setup) -> dict:
    """The plan's 4-bit base, optimizer, trained embeddings and packing: the arguments', else train's."""
    settings = memory.plan_settings(train, train.packing == "documents") if train else {}
    settings = {**settings, **{key: value for key, value in (("quantize", args.quantize), ("optimizer", args.optimizer))
                               if value is not None}}
    if args.train_embeddings:
        settings["train_embeddings"] = True
    if args.packing:
        settings["document_mask"] = args.packing == "documents"
    if (settings.get("quantize") == "nf4" or settings.get("train_embeddings")) and not setup.lora_r:
        raise UserError("--quantize nf4 and --train-embeddings plan a LoRA: give its rank with --lora-r (16, say)")
    if settings.get("quantize") == "nf4" and not args.no_checkpointing:
        settings["activation_checkpointing"] = True  # what every QLoRA recipe runs with
    return settings


def _config(path: str):
    """The config in a model folder or a config.json."""
    path = Path(path)
    folder = path.parent if path.name == "config.json" else path
    if not (folder / "config.json").is_file():
        raise UserError(f"--config {path}: no config.json there; give a HuggingFace model folder or its config.json")
    return AutoConfig.from_pretrained(folder)


def _tokenizer_size(init_from: str) -> int:
    if TOKENIZER_DIR.is_dir():
        from transformers import AutoTokenizer
        return len(AutoTokenizer.from_pretrained(str(TOKENIZER_DIR)))
    if init_from:
        return 0  # the model's own vocabulary
    raise UserError(f"{TOKENIZER_DIR} not found: the new model's vocabulary comes from the tokenizer; run "
                    "`dvc repro tokenizer` first, or pass --config")


if __name__ == "__main__":
    run_stage(main)
