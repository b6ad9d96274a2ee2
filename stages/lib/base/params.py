"""Typed, strict loading of params.yaml: one dataclass per stage section.

Every stage reads its params through `load_params()`. Unknown keys, wrong types and out-of-range values are
rejected here, once, with a message naming the key, the value and what is allowed; past this point the code
trusts its inputs.
"""

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from stages.lib.base.errors import UserError

PARAMS_FILE = "params.yaml"

# Where the stages put their intermediate outputs; dvc.yaml names the same folders.
RENDERED_DIR = Path("data/rendered")
TOKENIZER_DIR = Path("data/tokenizer")
TOKENS_DIR = Path("data/tokens")
MODELS_DIR = Path("models")  # the train stage exports models/<train.model_name>/ (HuggingFace layout)


class ParamError(UserError):
    """A value in params.yaml that cannot be used."""


def _param(default: Any, allowed: str = "", check: Callable[[Any], bool] | None = None) -> Any:
    """A dataclass field with an optional range check and its wording for error messages."""
    return field(default=default, metadata={"allowed": allowed, "check": check})


def _at_least(low: float) -> dict:
    return {"allowed": f">= {low}", "check": lambda v: v >= low}


def _positive() -> dict:
    return {"allowed": "> 0", "check": lambda v: v > 0}


@dataclass
class FieldNames:
    """The names a data file uses for our fields; empty: our own name (and, for chat, the usual alternatives).
    A dotted name (`answer_generation.train_messages`) is a path into nested objects."""

    text: str = ""  # plain text records (default `text`)
    instruction: str = ""  # instruction data (defaults `instruction`, `input`, `output`)
    input: str = ""
    output: str = ""
    messages: str = ""  # chat data (defaults `messages`, then ShareGPT's `conversations`)
    role: str = ""  # in each message (defaults `role`, then ShareGPT's `from`)
    content: str = ""  # in each message (defaults `content`, then ShareGPT's `value`)
    tools: str = ""  # the tool definitions of a tool-calling conversation (default `tools`)
    prompt: str = ""  # preference pairs (defaults `prompt`, `chosen`, `rejected`)
    chosen: str = ""
    rejected: str = ""


ROLE_NAMES = ("system", "user", "assistant", "tool", "tool_call")  # what a file's roles can be mapped to


@dataclass
class SourceParams:
    """One source of a mixture: a file, folder or glob inside render.data_path, and how often it is used."""

    path: str = ""
    # Times each document appears per epoch; a fraction takes a seeded subset (0.5: half of them, 2.5: all twice
    # and half a third time).
    weight: float = _param(1.0, **_positive())
    format: Literal["", "auto", "text", "instruction", "chat", "preference"] = ""  # "": render.format
    fields: FieldNames = field(default_factory=FieldNames)  # names set here replace render.fields' for this source


@dataclass
class RenderParams:
    """raw data -> rendered records (text with templates, prompt/response parts kept apart)."""

    data_path: str = "data/sample"  # a file, a folder or a glob; with `sources`, the folder holding them all
    sources: list[SourceParams] = field(default_factory=list)  # a weighted mixture; empty: data_path alone
    validation_path: str = ""  # documents for the validation split instead of tokenize.val_ratio
    format: Literal["auto", "text", "instruction", "chat", "preference"] = "auto"
    fields: FieldNames = field(default_factory=FieldNames)
    roles: dict[str, Literal[ROLE_NAMES]] = field(default_factory=dict)  # a file's role -> ours, beyond the known
    template: Literal["auto", "alpaca", "chatml", "tokenizer"] = "auto"
    text_split: Literal["paragraph", "line", "file"] = "paragraph"
    empty_answers: Literal["keep", "skip"] = "keep"
    long_record_chars: int = _param(50_000, "0 (off) or >= 1", lambda v: v >= 0)
    on_error: Literal["stop", "skip"] = "stop"
    workers: int | str = _param("auto", "'auto' or a whole number >= 1",
                                lambda v: v == "auto" or (type(v) is int and v >= 1))
    records_field: str = ""  # a JSON file holding one object: the key of its list of records (e.g. data)
    max_record_mb: float = _param(64.0, **_positive())  # a longer line or JSON element is a bad record


@dataclass
class TokenizerParams:
    """Where the tokenizer comes from: a HuggingFace folder, or a byte-level BPE trained here."""

    tokenizer_type: Literal["bpe", "huggingface"] = "bpe"
    tokenizer_path: str = ""  # folder with tokenizer.json / tokenizer_config.json (huggingface)
    vocab_size: int = _param(1024, **_at_least(64))  # bpe only
    min_frequency: int = _param(2, **_at_least(1))  # bpe only
    trust_remote_code: bool = False


@dataclass
class TokenizeParams:
    """rendered records -> token files for training and validation."""

    val_ratio: float = _param(0.05, "in [0, 1)", lambda v: 0 <= v < 1)
    shuffle: bool = True
    seed: int = _param(1337, **_at_least(0))
    save_bin: bool = True
    emit_jsonl: bool = False
    train_on_prompt: bool = False
    chunk_mb: float = _param(4.0, **_positive())  # text encoded per batch; bounds peak memory
    # auto: tiktoken for a byte-level BPE it encodes exactly (the same ids, faster); tokenizers: always the library
    encoder: Literal["auto", "tokenizers"] = "auto"


@dataclass
class ModelParams:
    """Size of a new Llama-style model (ignored when train.init_from names a pretrained folder)."""

    n_layer: int = _param(4, **_at_least(1))
    hidden_size: int = _param(128, **_at_least(8))
    n_head: int = _param(4, **_at_least(1))
    intermediate_size: int = _param(0, "0 (= 4 x hidden_size) or >= 1", lambda v: v >= 0)
    max_position_embeddings: int = _param(512, **_at_least(2))
    rope_theta: float = _param(10000.0, **_positive())
    tie_embeddings: bool = True


def _module_names(value: Any) -> bool:
    return value == "auto" or (isinstance(value, list) and bool(value) and
                               all(isinstance(name, str) and name for name in value))


@dataclass
class LoraParams:
    """LoRA adapters on a frozen pretrained model (train.init_from): rank 0 trains every weight instead."""

    r: int = _param(0, "0 (off: a full fine-tune) or >= 1", lambda v: v >= 0)
    alpha: float = _param(16.0, **_positive())  # the adapters' output is scaled by alpha / r
    dropout: float = _param(0.05, "in [0, 1)", lambda v: 0 <= v < 1)  # on each adapter's input, in training
    # auto: the attention and MLP projections (every linear layer of the transformer blocks); or a list of layer
    # names (q_proj, v_proj, ...): stages/lib/modeling/lora.py
    target_modules: str | list = _param("auto", "'auto' or a list of linear layer names such as [q_proj, v_proj]",
                                        _module_names)
    # nf4: the frozen base held in 4 bits (NormalFloat, double quantization, bitsandbytes), the adapters in fp32
    quantize: Literal["none", "nf4"] = "none"
    # Continued pretraining: train the input embeddings and the output head too, at train.embedding_lr
    train_embeddings: bool = False


@dataclass
class TrainParams:
    """One training session per run, resuming from the last checkpoint until the step budget is spent."""

    model_name: str = "sample-arith"
    init_from: str = ""  # a local HuggingFace model folder to fine-tune; empty builds `model` from scratch
    model: ModelParams = field(default_factory=ModelParams)
    lora: LoraParams = field(default_factory=LoraParams)
    # What models/<model_name>/ holds: the model (a LoRA merged into it), the LoRA adapter in PEFT's layout, or
    # both (the adapter in its adapter/ folder)
    export: Literal["merged", "adapter", "both"] = "merged"
    seq_len: int = _param(128, **_at_least(1))
    # How samples are cut from the token files (stages/lib/tokenizing/batches.py): windows of the token stream, or whole
    # documents with attention kept inside each; auto: documents when the data has prompts (instruction, chat).
    packing: Literal["auto", "stream", "documents"] = "auto"
    # What the run learns (stages/lib/modeling/preference_loss.py): sft (next tokens of the answers or text), or from
    # preference pairs dpo (against a reference model) or orpo (no reference). beta: DPO's temperature, ORPO's
    # lambda. reference (dpo): precomputed (the reference stage scores the pairs once with train.init_from) or
    # adapters_off (with LoRA: the same model with its adapters switched off, scored live)
    objective: Literal["sft", "dpo", "orpo"] = "sft"
    beta: float = _param(0.1, **_positive())
    reference: Literal["precomputed", "adapters_off"] = "precomputed"
    batch_size: int = _param(16, **_at_least(1))
    grad_accum: int = _param(1, **_at_least(1))
    lr: float = _param(3e-3, **_positive())
    min_lr: float = _param(3e-4, **_at_least(0))
    warmup_steps: int = _param(20, **_at_least(0))
    # The learning-rate curve over the whole run (stages/lib/training/schedule.py): cosine, or wsd (warmup, stable,
    # decay), which a run extended by a larger budget continues exactly.
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_steps: int = _param(0, "0 (use decay_fraction) or >= 1", lambda v: v >= 0)  # wsd: length of the decay
    decay_fraction: float = _param(0.2, "in (0, 1]", lambda v: 0 < v <= 1)  # wsd, when decay_steps is 0
    weight_decay: float = _param(0.1, **_at_least(0))
    # adamw8bit: bitsandbytes' 8-bit AdamW (about 2 bytes of state per trained parameter instead of 8)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    # The learning rate of embeddings and head trained beside LoRA adapters (train.lora.train_embeddings); 0: lr / 10
    embedding_lr: float = _param(0.0, "0 (lr / 10) or > 0", lambda v: v >= 0)
    beta1: float = _param(0.9, "in [0, 1)", lambda v: 0 <= v < 1)
    beta2: float = _param(0.95, "in [0, 1)", lambda v: 0 <= v < 1)
    grad_clip: float = _param(1.0, "0 (off) or > 0", lambda v: v >= 0)
    epochs: int = _param(1, **_at_least(1))  # used when total_step_budget is 0
    total_step_budget: int = _param(1000, "0 (use epochs) or >= 1", lambda v: v >= 0)
    steps_today: int = _param(0, "0 (until the budget is spent) or >= 1", lambda v: v >= 0)
    # Wall-clock limit of this session in minutes; auto: the limit the machine has (stages/lib/training/deadline.py).
    minutes_today: float | str = _param(0.0, "0 (no limit), a number of minutes > 0, or 'auto'",
                                        lambda v: v == "auto" or (type(v) in (int, float) and v >= 0))
    save_every: int = _param(100, **_at_least(1))
    eval_every: int = _param(50, **_at_least(1))
    # Validation scores eval_batches x the run's global batch (batch_size x grad_accum x processes) fixed samples,
    # the same in every session of a run whatever its batch_size, so val/loss stays comparable.
    eval_batches: int = _param(8, **_at_least(1))
    log_every: int = _param(10, **_at_least(1))  # a plain log line every N steps when the output is not a terminal
    seed: int = _param(1337, **_at_least(0))
    resume: Literal["auto", "require", "never"] = "auto"
    # auto: bf16 on GPUs with native bf16, fp16 + loss scaling on older GPUs, fp32 on CPU
    # (stages/lib/modeling/precision.py)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = False  # recompute each transformer block in the backward pass: less memory
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Processes to train on, one per GPU: a number, or "auto" (every visible GPU, 1 on CPU). More than 1 launches
    # the stage through torchrun; under a torchrun started by hand the world comes from torchrun instead.
    devices: int | str = _param(1, "'auto' or a whole number >= 1",
                                lambda v: v == "auto" or (type(v) is int and v >= 1))
    strategy: Literal["ddp", "fsdp"] = "ddp"  # with several processes: full replicas (ddp) or sharded (fsdp)
    checkpoint_dir: str = "checkpoints"
    out_dir: str = "outputs"


@dataclass
class EvaluateParams:
    """Scoring the exported model: validation loss and perplexity, and answers to held-out prompts."""

    max_val_tokens: int = _param(0, "0 (all) or >= 1", lambda v: v >= 0)  # validation tokens scored, from the start
    prompts_path: str = "data/eval/heldout.jsonl"  # Alpaca-style JSONL; empty: no generation
    num_prompts: int = _param(0, "0 (all) or >= 1", lambda v: v >= 0)
    max_new_tokens: int = _param(64, **_at_least(1))
    batch_size: int = _param(8, **_at_least(1))  # windows per loss batch and prompts per generation batch


@dataclass
class Params:
    """All of params.yaml."""

    render: RenderParams = field(default_factory=RenderParams)
    tokenizer: TokenizerParams = field(default_factory=TokenizerParams)
    tokenize: TokenizeParams = field(default_factory=TokenizeParams)
    train: TrainParams = field(default_factory=TrainParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; raise ParamError naming the offending key."""
    path = Path(path)
    if not path.exists():
        raise ParamError(f"{path} not found: run the stage from the repository root, where params.yaml lives")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ParamError(f"{path} is not valid YAML: {err}") from None
    params = parse_params(raw, source=str(path))
    _check_across_sections(params, str(path))
    return params


def parse_params(raw: Any, source: str = PARAMS_FILE) -> Params:
    """Build Params from an already-parsed mapping (what params.yaml holds)."""
    return _build(Params, raw, prefix="", source=source)


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ParamError(f"{source}: {where} must be a mapping of keys to values, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys: {', '.join(fields)}"
            raise ParamError(f"{source}: unknown key '{prefix}{key}'{hint}")
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(hints[name], raw[name], f, f"{prefix}{name}", source) for name, f in fields.items()
              if name in raw}
    return cls(**values)


def _coerce(kind: Any, value: Any, f: dataclasses.Field, key: str, source: str) -> Any:
    """Check one value against its declared type and range; return it in that type."""
    if dataclasses.is_dataclass(kind):
        return _build(kind, value if value is not None else {}, f"{key}.", source)
    value = _typed(kind, value, key, source)
    check = f.metadata.get("check")
    if check is not None and not check(value):
        raise _not_allowed(key, value, f.metadata["allowed"], source)
    return value


def _typed(kind: Any, value: Any, key: str, source: str) -> Any:
    """`value` checked against the type `kind` (lists and mappings item by item)."""
    def bad(allowed: str) -> ParamError:
        return _not_allowed(key, value, allowed, source)

    origin = typing.get_origin(kind)
    if origin is list:
        value = [] if value is None else value
        if not isinstance(value, list):
            raise bad("a list")
        (item,) = typing.get_args(kind)
        if dataclasses.is_dataclass(item):
            return [_build(item, v, f"{key}[{i}].", source) for i, v in enumerate(value)]
        return [_typed(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        value = {} if value is None else value
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("a mapping of names to values")
        _, item = typing.get_args(kind)
        return {k: _typed(item, v, f"{key}.{k}", source) for k, v in value.items()}
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise bad("one of " + ", ".join(repr(c) for c in choices))
    elif kind is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
    elif kind is float:
        value = _as_float(value)
        if value is None:
            raise bad("a number")
    elif kind is str:
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise bad("a string")
    return value


def _not_allowed(key: str, value: Any, allowed: str, source: str) -> ParamError:
    return ParamError(f"{source}: {key} = {value!r} is not allowed; expected {allowed}")


def _as_float(value: Any) -> float | None:
    # YAML 1.1 reads `3e-4` (no dot) as a string; accept it, since that is how people write learning rates.
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _check_across_sections(params: Params, source: str) -> None:
    """Rules that involve more than one key."""
    tok, train = params.tokenizer, params.train
    for i, src in enumerate(params.render.sources):
        if not src.path:
            raise ParamError(f"{source}: render.sources[{i}] has no path; each source needs `path:` (a file, folder "
                             "or glob inside render.data_path) and optionally `weight:`")
    if tok.tokenizer_type == "huggingface" and not tok.tokenizer_path:
        raise ParamError(f"{source}: tokenizer.tokenizer_type is 'huggingface' but tokenizer.tokenizer_path is empty; "
                         "set it to a folder holding tokenizer.json (or use tokenizer_type: bpe)")
    if params.render.template == "tokenizer" and tok.tokenizer_type != "huggingface":
        raise ParamError(f"{source}: render.template = 'tokenizer' needs tokenizer.tokenizer_type: huggingface "
                         "(a BPE trained here has no chat template of its own); use 'chatml' or 'auto'")
    if train.min_lr > train.lr:
        raise ParamError(f"{source}: train.min_lr = {train.min_lr} is above train.lr = {train.lr}; "
                         "expected min_lr <= lr")
    if train.lora.r and not train.init_from:
        raise ParamError(f"{source}: train.lora.r = {train.lora.r} trains LoRA adapters on a pretrained model, but "
                         "train.init_from is empty; set it to the model's folder (or set train.lora.r: 0 to train "
                         "a new model from train.model)")
    if train.init_from and Path(train.init_from).resolve() == (MODELS_DIR / train.model_name).resolve():
        raise ParamError(f"{source}: train.init_from = {train.init_from!r} is the folder this run exports to "
                         f"(train.model_name = {train.model_name!r}): every session would replace its own base. "
                         f"Copy the model to continue from (cp -r {train.init_from} models/{train.model_name}-base) "
                         "and point train.init_from there, or give this run another train.model_name")
    for key, value, off in (("quantize", train.lora.quantize, "none"),
                            ("train_embeddings", train.lora.train_embeddings, False)):
        if value != off and not train.lora.r:
            raise ParamError(f"{source}: train.lora.{key} = {value!r} applies to LoRA adapters, but train.lora.r is "
                             f"0 (a full fine-tune); set train.lora.r (e.g. 16) or train.lora.{key}: {off}")
    if train.lora.quantize != "none" and train.strategy == "fsdp":
        raise ParamError(f"{source}: train.lora.quantize = {train.lora.quantize!r} holds the base in 4 bits, which "
                         "train.strategy = fsdp cannot shard; use train.strategy: ddp (each process holds the "
                         "4-bit base whole)")
    if train.optimizer == "adamw8bit" and train.strategy == "fsdp":
        raise ParamError(f"{source}: train.optimizer = 'adamw8bit' keeps block-wise 8-bit state that "
                         "train.strategy = fsdp cannot shard; use train.strategy: ddp, or train.optimizer: adamw")
    if train.objective == "dpo" and not train.init_from:
        raise ParamError(f"{source}: train.objective = 'dpo' tunes a trained model against itself as the reference, "
                         "but train.init_from is empty; set it to the model to tune (the base, or the export of an "
                         "SFT run), or use train.objective: orpo, which needs no reference")
    if train.objective == "dpo" and train.reference == "adapters_off" and not train.lora.r:
        raise ParamError(f"{source}: train.reference = 'adapters_off' scores the reference as the model with its LoRA "
                         "adapters switched off, but train.lora.r is 0; set train.lora.r (e.g. 16) or "
                         "train.reference: precomputed")
    if train.export != "merged" and not train.lora.r:
        raise ParamError(f"{source}: train.export = {train.export!r} exports a LoRA adapter, but train.lora.r is 0 "
                         "(no adapters); set train.lora.r (e.g. 16) or train.export: merged")
    model = train.model
    if not train.init_from:
        if model.hidden_size % model.n_head:
            raise ParamError(f"{source}: train.model.hidden_size = {model.hidden_size} is not divisible by "
                             f"train.model.n_head = {model.n_head}")
        if train.seq_len > model.max_position_embeddings:
            raise ParamError(f"{source}: train.seq_len = {train.seq_len} is above "
                             f"train.model.max_position_embeddings = {model.max_position_embeddings}; "
                             "lower seq_len or raise max_position_embeddings")
