"""LoRA adapters (PEFT's) on a frozen pretrained model: which layers get them, the model as it trains, and the two
exports, the adapters merged into the base or alone in PEFT's own layout.

With `train.lora.r` > 0 (the base is `train.init_from`):
- Targets (`train.lora.target_modules`): `auto` is every linear layer of the transformer blocks, the attention and
  MLP projections (Llama, Mistral, Qwen2: q/k/v/o_proj, gate/up/down_proj; Phi: q/k/v_proj, dense, fc1, fc2;
  GPT-2: c_attn, c_proj, c_fc); a list names layers by the last part of their name, as PEFT matches them. A name
  that is no linear layer of the model is a UserError listing those it has.
- Each target gets PEFT's LoRA: its output plus (alpha / r) x B(A(dropout(x))), A (r x in) drawn kaiming-uniform
  from the run's seed, B (out x r) zeros, so training starts exactly from the base. Everything else is frozen and
  held in the session's compute dtype (fp32 on a CPU, bf16 or fp16 on a GPU: `base_dtype`); the adapters are fp32,
  so their gradients and AdamW state are too.
- QLoRA (`train.lora.quantize: nf4`): the frozen base's linear layers are loaded in 4 bits through bitsandbytes, as
  transformers and PEFT do it (BitsAndBytesConfig: NormalFloat 4, double quantization, compute in the session's
  dtype); the embeddings, norms and output head stay in the compute dtype, the adapters and their optimizer state
  in fp32. Only the session holds 4-bit weights: the exports rebuild the base from its files (below), so a merged
  export is the base as its files hold it plus the adapters, never weights rounded to 4 bits.
- The adapters are the model's parameters that require a gradient, under the model's own state-dict names
  (`model.layers.0.self_attn.q_proj.lora_A.default.weight`): what the checkpoint's `adapters` part holds
  (stages/lib/checkpointing/parts.py), never the base.
- Continued pretraining (`train.lora.train_embeddings`): the input embeddings and the output head train too, as
  PEFT's modules_to_save (a trained fp32 copy beside the frozen original; one copy for tied embeddings), and are
  saved with the adapters. A tokenizer larger than the base's embeddings then grows them (new rows drawn from the
  run's seed); without train_embeddings the new rows would stay random and frozen: a UserError instead.
- Exports (`train.export`, written by stages/lib/modeling/export.py): `trained_model` rebuilds the base on the CPU in
  the dtype its files hold, with the trained adapters; `save_adapter` writes PEFT's layout (adapter_config.json,
  adapter_model.safetensors) that `PeftModel.from_pretrained(base, folder)` loads, the base's path recorded as
  train.init_from gives it; `merge_adapters` folds them into the base weights (PEFT's merge), leaving the plain
  HuggingFace model.
"""

import json
from pathlib import Path

import torch

from stages.lib.base.errors import UserError
from stages.lib.base.params import LoraParams, TrainParams
from stages.lib.modeling.families import base_config, pretrained_model, set_special_ids, transformer_blocks

ADAPTER = "default"  # PEFT's adapter name: it appears in the state-dict names, never in an export
# torch's, GPT-2's transposed one (PEFT's fan_in_fan_out), and bitsandbytes' 4-bit one (train.lora.quantize)
LINEAR_TYPES = ("Linear", "Conv1D", "Linear4bit")
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the model's names in adapter_model.safetensors


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer's last name (q_proj, lm_head, ...) -> (input features, output features) summed over the
    layers of that name: what LoRA adapters of rank r on them hold is r x (inputs + outputs)."""
    layers: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if type(module).__name__ in LINEAR_TYPES:
            inputs, outputs = _features(module)
            seen = layers.get(name.rsplit(".", 1)[-1], (0, 0))
            layers[name.rsplit(".", 1)[-1]] = (seen[0] + inputs, seen[1] + outputs)
    return layers


def _features(module: torch.nn.Module) -> tuple[int, int]:
    if type(module).__name__ == "Conv1D":  # weight is (in, out)
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def block_linears(model: torch.nn.Module) -> list[str]:
    """The last names of the linear layers inside the transformer blocks: `auto`'s targets."""
    return sorted({name.rsplit(".", 1)[-1] for block in transformer_blocks(model)
                   for name, module in block.named_modules() if type(module).__name__ in LINEAR_TYPES})


def target_modules(wanted: str | list, linears: dict, in_blocks: list[str]) -> list[str]:
    """The layer names adapters go on, for train.lora.target_modules = `wanted`; a UserError for a name that is no
    linear layer of the model, listing those it has."""
    if wanted == "auto":
        if not in_blocks:
            raise UserError("train.lora.target_modules = auto: this model's transformer blocks are unknown "
                            f"(its _no_split_modules names none); list the layers instead, from: {', '.join(linears)}")
        return list(in_blocks)
    unknown = [name for name in wanted if name not in linears]
    if unknown:
        raise UserError(f"train.lora.target_modules: {', '.join(map(repr, unknown))} "
                        f"{'is' if len(unknown) == 1 else 'are'} no linear layer of this model; its linear layers "
                        f"are {', '.join(linears)} (or use auto: {', '.join(in_blocks)})")
    return sorted(set(wanted))


def base_dtype(train: TrainParams, autocast_dtype: torch.dtype | None) -> torch.dtype:
    """What the model's weights are held in: fp32 master weights when they train; under LoRA the frozen base in
    the passes' compute dtype (autocast's, else fp32)."""
    return (autocast_dtype or torch.float32) if train.lora.r else torch.float32


def base_load_options(lora_params: LoraParams, autocast_dtype: torch.dtype | None, device: torch.device) -> dict:
    """What `from_pretrained` needs besides the dtype to hold the frozen base as train.lora.quantize says: for nf4,
    bitsandbytes' 4-bit config, the base quantized as it loads straight onto `device` (never a 16-bit copy there)."""
    if lora_params.quantize == "none":
        return {}
    from transformers import BitsAndBytesConfig
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=autocast_dtype or torch.float32)
    if device.type == "cuda" and device.index is None:  # the device map wants the card by its number
        device = torch.device("cuda", torch.cuda.current_device())
    return {"quantization_config": config, "device_map": {"": str(device)}}


def check_vocabulary(train: TrainParams, vocab_size: int) -> None:
    """A UserError when the tokenizer has more tokens than the base has embeddings and they do not train (see the
    module docstring)."""
    base = base_config(train.init_from).vocab_size
    if vocab_size > base and not train.lora.train_embeddings:
        raise UserError(f"train.lora.r = {train.lora.r}: the tokenizer (data/tokenizer) has {vocab_size} tokens but "
                        f"the base model in {train.init_from} has embeddings for {base}; a LoRA keeps the "
                        "embeddings frozen, so the new tokens would never learn. Use the base model's own tokenizer "
                        "(tokenizer.tokenizer_type: huggingface, tokenizer.tokenizer_path: the model's folder), "
                        "train the embeddings too (train.lora.train_embeddings: true), or a full fine-tune "
                        "(train.lora.r: 0), which trains the new rows")


def checked_plan_settings(train: TrainParams, vocab_size: int, shape) -> dict:
    """The LoRA settings of the memory plan's Setup for `shape` (stages/lib/modeling/memory.py ModelShape), checked
    against the model before anything is loaded: its layers and its vocabulary. Empty for a full fine-tune."""
    if not train.lora.r:
        return {}
    check_vocabulary(train, vocab_size)
    targets = target_modules(train.lora.target_modules, shape.linear_layers, list(shape.block_linears))
    return {"lora_r": train.lora.r, "lora_targets": tuple(targets), "lora_dropout": train.lora.dropout > 0}


def add_adapters(model: torch.nn.Module, lora: LoraParams) -> torch.nn.Module:
    """Put adapters on `model`'s targets (in place; the rest frozen) and return it; adapters fp32, drawn from the
    torch generator's current state."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    targets = target_modules(lora.target_modules, linear_layers(model), block_linears(model))
    transposed = any(type(m).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in targets
                     for name, m in model.named_modules())
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        fan_in_fan_out=transposed, bias="none", task_type="CAUSAL_LM",
                        **(_embeddings_to_train(model) if lora.train_embeddings else {}))
    same_4bit_passes_everywhere(model)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # PEFT freezes everything but the adapters
    cast_adapter_dtype(model, adapter_name=ADAPTER)  # fp32 adapters on a 16-bit base
    for module in _trained_copies(model):
        module.float()  # the trained embeddings and head too: fp32 master weights
    return model


def _embeddings_to_train(model: torch.nn.Module) -> dict:
    """LoraConfig's settings that train the input embeddings and the output head (PEFT's modules_to_save, matched
    by the last part of their names); tied ones stay one tensor."""
    wanted = {model.get_input_embeddings(), model.get_output_embeddings()} - {None}
    names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module in wanted})
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    return {"modules_to_save": names, "ensure_weight_tying": tied}


def _trained_copies(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The trained copies of whole modules (embeddings, head) that PEFT's modules_to_save put beside the originals."""
    from peft.utils import ModulesToSaveWrapper
    return [m.modules_to_save[ADAPTER] for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]


def same_4bit_passes_everywhere(model: torch.nn.Module) -> None:
    """Keep bitsandbytes' 4-bit layers on one path in training and evaluation alike: on CPUs with AVX512-bf16 it
    repacks a layer's weights in place for its first pass without gradients and then computes it in bf16, so the
    validation loss would depend on the CPU and the layer's layout on whether it was evaluated."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def adapter_names(model: torch.nn.Module) -> set[str]:
    """The state-dict names of the adapters (the parameters that train)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def trained_model(train: TrainParams, vocab_size: int, special_ids: dict, adapters: dict) -> torch.nn.Module:
    """The base on the CPU, in the dtype its files hold, with the trained `adapters` (state-dict names) in place:
    what the exports are made from, whatever trained it (one process, DDP or FSDP) or once the run is over."""
    base = pretrained_model(train.init_from, vocab_size, train.seq_len, train.seed, dtype="auto")
    set_special_ids(base, special_ids)
    model = add_adapters(base, train.lora)
    missing = adapter_names(model) - set(adapters)
    unexpected = set(adapters) - set(model.state_dict())
    if missing or unexpected:
        raise UserError(f"the checkpoint's adapters do not fit the LoRA of train.lora on {train.init_from} "
                        f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model.load_state_dict(adapters, strict=False)
    return model.eval()


def save_adapter(model: torch.nn.Module, folder: Path, base_model: str) -> None:
    """The adapters in PEFT's layout in `folder`: adapter_config.json (recording `base_model`, the base's path) and
    adapter_model.safetensors, the tensors PeftModel.save_pretrained would write; same adapters, same bytes."""
    import copy

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.peft_config[ADAPTER])
    config.base_model_name_or_path, config.inference_mode = base_model, True
    config.save_pretrained(str(folder))
    # The trained embeddings and head are in it as modules_to_save; tied ones appear under both names, each stored.
    tensors = get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
    save_file({PEFT_PREFIX + name: t.detach().clone().contiguous() for name, t in sorted(tensors.items())},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def trains_embeddings(adapter_config: Path) -> bool:
    """Whether the adapter of this adapter_config.json carries trained embeddings and head (modules_to_save)."""
    return bool(json.loads(Path(adapter_config).read_text(encoding="utf-8")).get("modules_to_save"))


def adapter_on_its_base(folder: Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """An adapter export with trained embeddings on its base (the path its config records), the base's
    embeddings first grown to the adapter's vocabulary, as the session grew them (the trained rows replace them)."""
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(folder) / "adapter_config.json").read_text(encoding="utf-8"))
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"],
                                                trust_remote_code=trust_remote_code)
    name = next(n for n, m in base.named_modules() if m is base.get_input_embeddings())
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), "pt") as f:
        rows = f.get_slice(f"{PEFT_PREFIX}{name}.weight").get_shape()[0]
    if rows > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(rows, mean_resizing=False)
    return PeftModel.from_pretrained(base, str(folder))


def merge_adapters(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its layer's weight (PEFT's merge) and put the plain layers back, in place: the
    model as HuggingFace knows it, of the base's size. A model without adapters is left as it is."""
    if not hasattr(model, "peft_config"):
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):  # the trained embeddings or head, in the base's dtype
            plain = module.modules_to_save[ADAPTER].to(module.original_module.weight.dtype)
        elif isinstance(module, BaseTunerLayer):
            module.merge()
            plain = module.get_base_layer()
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, plain)
    del model.peft_config
    return model
