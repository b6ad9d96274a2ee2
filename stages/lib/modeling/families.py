"""Model families: a new small Llama, or a pretrained HuggingFace folder, and the facts about a family that the rest
of the code relies on (whether its logits are a plain linear head, its repeated blocks, its tied weights).

Adding a model family means looking here first: a family whose head is plain linear (with or without a bias) joins
PLAIN_HEAD_MODELS, and the chunked loss (stages/lib/modeling/loss.py) then computes exactly what the family's own
forward would.
"""

import copy
import functools
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedConfig, PreTrainedModel

from stages.lib.base.errors import UserError
from stages.lib.base.params import ModelParams, TrainParams
from stages.lib.modeling.model_folders import check_model_folder, tensor_names_in_files

# Model families whose logits are exactly `lm_head(last hidden state)`, an nn.Linear (Phi's has a bias; no scaling
# or soft-capping), so the chunked loss computes the same thing as their own forward. Others fall back to the
# model's own logits.
PLAIN_HEAD_MODELS = {"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gpt2", "gpt_neox", "olmo", "olmo2",
                     "smollm3"}


def build_model(train: TrainParams, vocab_size: int, special_ids: dict,
                dtype: torch.dtype = torch.float32, **load_options) -> PreTrainedModel:
    """The run's model as it is before any training (same seed, same weights); `dtype` and `load_options`: a
    pretrained model's (see `pretrained_model`)."""
    if train.init_from:
        model = pretrained_model(train.init_from, vocab_size, train.seq_len, train.seed, dtype, **load_options)
    else:
        model = new_model(train.model, vocab_size, special_ids, train.seed)
    set_special_ids(model, special_ids)
    return model


def base_config(folder: str) -> PreTrainedConfig:
    """The config.json of a pretrained folder, read once however many checks ask (the memory plan, the vocabulary,
    the base's tensors): a copy each caller may change. A config.json changed since it was read is read again."""
    stat = (Path(folder) / "config.json").stat()
    return copy.deepcopy(_read_config(str(Path(folder).resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_config(folder: str, mtime_ns: int, size: int) -> PreTrainedConfig:
    return AutoConfig.from_pretrained(folder)


def model_config(train: TrainParams, vocab_size: int, special_ids: dict) -> PreTrainedConfig:
    """The config of the run's model, read or built without loading a weight (what the memory plan starts from)."""
    if not train.init_from:
        return new_model_config(train.model, vocab_size, special_ids)
    check_model_folder(train.init_from)
    config = base_config(train.init_from)
    config.vocab_size = max(config.vocab_size, vocab_size)  # as `pretrained_model` grows it
    return config


def new_model_config(p: ModelParams, vocab_size: int, special_ids: dict) -> LlamaConfig:
    """The config of a new Llama-style model of the size in `train.model`."""
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size or 4 * p.hidden_size,
        num_hidden_layers=p.n_layer, num_attention_heads=p.n_head, num_key_value_heads=p.n_head,
        max_position_embeddings=p.max_position_embeddings, tie_word_embeddings=p.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": p.rope_theta}, use_cache=False, **special_ids)


def new_model(p: ModelParams, vocab_size: int, special_ids: dict, seed: int) -> PreTrainedModel:
    """A freshly initialised Llama-style model of the size in `train.model`, identical for the same seed."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(new_model_config(p, vocab_size, special_ids), dtype=torch.float32,
                                             attn_implementation="sdpa")
    scale_residual_init(model, p.n_layer)
    return model


def scale_residual_init(model: PreTrainedModel, n_layer: int) -> None:
    """GPT-2's initialisation of the projections that write into the residual stream (attention output, MLP
    down): std / sqrt(2 * layers), so the stream's variance at the start does not grow with depth. HuggingFace's
    Llama draws them like every other matrix; on the tinyshakespeare comparison with nanoGPT (bench/bench_nanogpt.py)
    this lowers the validation loss after 200 steps."""
    std = model.config.initializer_range / (2 * n_layer) ** 0.5
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                weight.normal_(0.0, std)


def pretrained_model(folder: str, vocab_size: int, seq_len: int, seed: int,
                     dtype: torch.dtype | str = torch.float32, **load_options) -> PreTrainedModel:
    """A pretrained model to fine-tune from a local folder, its vocabulary grown to the tokenizer's if smaller.

    `dtype`: what the weights are held in, converted as they load (a 16-bit folder is never first made a full fp32
    copy): fp32 for weights that train, which are the master weights in every precision mode; a base that stays
    frozen (LoRA) needs only the 16 bits its passes compute in; "auto": the dtype its files hold.
    `load_options`: more arguments of from_pretrained, such as a 4-bit base's (stages/lib/modeling/lora.py).
    """
    check_model_folder(folder)
    check_base_tensors(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **load_options)
    except Exception as err:  # transformers raises many kinds (bad config, missing or damaged weights, unknown type)
        raise UserError(f"train.init_from = {folder!r}: transformers cannot load a causal language model from it "
                        f"({type(err).__name__}: {str(err).strip().splitlines()[0][:300]}). Check that the folder "
                        "holds config.json and its weight files (model.safetensors), whole, as `save_pretrained` "
                        "or `hf download` writes them") from None
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise UserError(f"train.seq_len = {seq_len} is above the {positions} positions the model in "
                        f"{folder} supports; lower train.seq_len to at most {positions}")
    if vocab_size > model.get_input_embeddings().num_embeddings:
        torch.manual_seed(seed)  # new embedding rows are drawn at random: keep them the same on every start
        model.resize_token_embeddings(vocab_size)
    model.config.use_cache = False
    return model


def check_base_tensors(folder: str) -> None:
    """A UserError unless the base's files hold every tensor its model expects and none it does not know, read from
    the safetensors headers (transformers would fill a missing tensor with new random values and go on). A tensor
    tied to another (the head to the embeddings) is not missing; a folder already quantized, or whose weights are
    not in safetensors, is left to transformers."""
    import re
    config = base_config(folder)
    found = tensor_names_in_files(folder)
    if found is None or getattr(config, "quantization_config", None):
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    expected = set(model.state_dict())
    prefix = model.base_model_prefix
    found |= {f"{prefix}.{name}" for name in found if f"{prefix}.{name}" in expected}  # a base model's own names
    tied = [group for group in tied_names(model) if set(group) & found]
    missing = sorted(expected - found - {name for group in tied for name in group})
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    known = expected | {name for name, _ in model.named_buffers()}  # old files hold buffers such as inv_freq
    unexpected = sorted(name for name in found if name not in known and f"{prefix}.{name}" not in known
                        and not any(p.search(name) for p in ignored))
    if len(missing) > len(expected) // 2:
        return  # another naming scheme (an older checkpoint transformers converts as it loads): its own report
    if missing or unexpected:
        what = [f"missing {len(missing)}: {_listed(missing)}"] if missing else []
        what += [f"unexpected {len(unexpected)}: {_listed(unexpected)}"] if unexpected else []
        raise UserError(f"train.init_from = {folder!r}: its weight files do not hold the tensors a "
                        f"{type(model).__name__} of its config.json has ({'; '.join(what)}). transformers would "
                        "fill missing ones with random values; download or export the base again, whole")


def _listed(names: list[str], most: int = 8) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def pick_document_attention(model: PreTrainedModel, device: torch.device, autocast_dtype: torch.dtype | None) -> str:
    """Switch the model to the fastest attention transformers offers for packed documents here; returns its name.

    Position ids that restart at each document tell transformers where documents begin. With `sdpa` (the default,
    and the only choice on CPUs) it builds a block-diagonal causal mask; with the flash-attention package on a GPU
    running bf16 or fp16, the variable-length kernel attends within each document only, computing nothing for the
    masked blocks (batches are then flattened into one row, as that kernel wants: see stages/lib/modeling/loss.py).
    """
    if flash_attention_for_documents(device, autocast_dtype) and getattr(model, "_supports_flash_attn", False):
        model.set_attn_implementation("flash_attention_2")
    return model.config._attn_implementation


def flash_attention_for_documents(device: torch.device, autocast_dtype: torch.dtype | None) -> bool:
    """Whether packed documents can go through the flash-attention varlen kernel here (a GPU computing in 16 bits
    with the flash-attention package): no sequence x sequence mask then (what the memory plan counts otherwise)."""
    from transformers.utils import is_flash_attn_2_available
    return (device.type == "cuda" and autocast_dtype in (torch.bfloat16, torch.float16)
            and is_flash_attn_2_available())


def keeps_documents_apart(model: PreTrainedModel, device: torch.device | None = None,
                          hidden_states: Callable | None = None) -> bool:
    """Whether the model's attention honours position ids that restart at a document: probed on one packed row of
    two documents, whose second must come out as it does alone (a model family whose own code ignores them would
    let packed documents see each other). `device`: where the model is (the CPU before it is moved);
    `hidden_states(inputs, positions)`: how to run its trunk (by default, directly)."""
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=device)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]], device=device)
    run = hidden_states or (lambda inputs, at: model.base_model(input_ids=inputs, position_ids=at,
                                                                use_cache=False).last_hidden_state)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed, alone = run(ids, positions), run(ids[:, 3:], None)
    finally:
        model.train(was_training)
    # A 16-bit base (a LoRA's) or 16-bit autocast rounds differently in the two shapes; documents that saw each other
    # differ by far more.
    sixteen_bits = packed.dtype != torch.float32 or torch.is_autocast_enabled(packed.device.type)
    tolerance = 2e-2 if sixteen_bits else 1e-4
    return torch.allclose(packed[:, 3:].float(), alone.float(), rtol=10 * tolerance, atol=tolerance)


def has_plain_head(model: PreTrainedModel) -> bool:
    """Whether the logits are just a linear map of the last hidden state, plus a bias (so chunking is exact)."""
    head = model.get_output_embeddings()
    return model.config.model_type in PLAIN_HEAD_MODELS and isinstance(head, torch.nn.Linear)


def transformer_blocks(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's repeated blocks (decoder layers), the units FSDP shards and gathers one at a time.

    HuggingFace names their classes in `_no_split_modules` (e.g. LlamaDecoderLayer).
    """
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Recompute each transformer block's activations in the backward pass instead of keeping them (activation
    checkpointing, non-reentrant): the block inputs alone stay in memory, for one more forward pass of compute.

    HuggingFace's own switch: it checkpoints each block's `forward`, so parameter names and FSDP's hooks stay as
    they are, and the recomputation replays the random state (dropout) of the first pass.
    """
    if not model.supports_gradient_checkpointing or not transformer_blocks(model):
        raise UserError(f"train.activation_checkpointing: this {type(model).__name__} does not support it; set "
                        "train.activation_checkpointing: false")
    enable = getattr(model, "activation_checkpointing_enable", None)  # newer transformers; older ones: the old name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor in `model` (tied embeddings), each group sorted."""
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    in_state = set(model.state_dict())
    for name, tensor in named:
        if name in in_state:
            groups.setdefault(id(tensor), []).append(name)
    return [sorted(names) for names in groups.values() if len(names) > 1]


def set_special_ids(model: PreTrainedModel, special_ids: dict) -> None:
    """Record the tokenizer's BOS/EOS/PAD ids in the config and the generation config (PAD falls back to EOS)."""
    for key, value in special_ids.items():
        setattr(model.config, key, value)
    gen = model.generation_config
    gen.bos_token_id = special_ids.get("bos_token_id")
    gen.eos_token_id = special_ids.get("eos_token_id")
    gen.pad_token_id = special_ids.get("pad_token_id")
    if gen.pad_token_id is None:
        gen.pad_token_id = gen.eos_token_id
