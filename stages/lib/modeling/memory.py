"""The memory plan of a training session, made from the model's config before a weight is loaded: what weights,
gradients, optimizer state, activations and the loss head take, against the device's free memory, and the settings
that would fit when they do not.

Bytes per parameter (N parameters, of which T train: all of them, or a LoRA's adapters, r x (inputs + outputs) of
each layer they adapt):
- weights: fp32 master weights, 4N (a LoRA base frozen in 16 bits: 2N, plus 4T of adapters);
- 16-bit copies: under bf16/fp16 autocast each block weight is cast once per forward pass and the copy kept for the
  backward pass, 2 bytes per block parameter (one block at a time with activation checkpointing);
- gradients 4T, AdamW's two fp32 moments 8T; FSDP divides these three by the number of processes;
- activations: what autograd keeps for the backward pass, per token and block, counted from the block's structure
  (`block_bytes_per_token`, checked against what autograd really keeps in tests/test_memory.py); with activation
  checkpointing, each block's input (fp32, 4 x hidden per token) and one block recomputed at a time; a LoRA adds,
  per adapted layer and token, its dropout's output and mask (inputs x (2 or 4 bytes + 1)) and A's output (r);
- the loss head (stages/lib/modeling/loss.py): its gradients, computed in the forward pass (the head weight's 4 x vocab
  x hidden, the hidden states' gradient), and one chunk of logits; a model without a plain head holds full logits.
The peak is the larger of two moments: the end of the forward pass (activations and head gradients, plus the larger
of the head's chunk of logits and the gradients in flight through one block as the backward pass starts; gradients
of earlier micro-steps when grad_accum > 1) and the end of the backward pass (all gradients). A plan fits when its
peak plus HEADROOM is within the free memory. Checked against what PyTorch allocates by bench/bench_memory.py.
"""

from dataclasses import dataclass, replace

import torch

from stages.lib.modeling.families import has_plain_head, transformer_blocks
from stages.lib.modeling.lora import block_linears, linear_layers
from stages.lib.modeling.loss import LOGITS_PER_CHUNK

GIB = 2 ** 30
HEADROOM = 0.10  # allocator fragmentation, cuBLAS workspaces, what the estimate leaves out
LORA_RANK = 16  # the rank the advice plans a LoRA with (on `auto`'s targets, with train.lora's default dropout)
LORA_PARAM = "train.lora.r"  # the params key that turns LoRA on
PYTHON_ACTIVATIONS = {"gelu_new", "gelu_fast", "gelu_accurate"}  # formulas of several kernels: 4 tensors kept


@dataclass(frozen=True)
class Block:
    """The structure of a transformer block that decides what it keeps for the backward pass."""

    attention_inputs: int  # linears reading the attention's input: q, k, v apart (3) or fused (1)
    mlp_inputs: int  # linears reading the MLP's input: gate and up apart (2), fused or a plain up-projection (1)
    gated: bool  # SwiGLU-style: act(gate) * up
    norms: int
    rms_norm: bool
    activation_tensors: int  # what the MLP's activation keeps (1 for one kernel such as silu)
    dropout_masks: int  # residual dropouts active in training (one byte per element)

    @property
    def parallel(self) -> bool:
        """Attention and MLP read the same normed input (Phi, GPT-J): one norm per block."""
        return self.norms == 1


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model, read from its config on PyTorch's meta device (no memory)."""

    family: str
    parameters: int
    block_parameters: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    plain_head: bool
    head_trains_bias: bool
    linear_layers: dict  # each linear layer's last name -> (input, output features) summed over the model
    block_linears: tuple  # the names of those inside the blocks (where `auto` puts LoRA adapters)
    block: Block
    tied_head: bool


def model_shape(config) -> ModelShape:
    """The ModelShape of the model `config` describes (a transformers config)."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    blocks = transformer_blocks(model)
    head = model.get_output_embeddings()
    hidden, heads = config.hidden_size, config.num_attention_heads
    parameters = sum(p.numel() for p in model.parameters())
    return ModelShape(
        family=config.model_type, parameters=parameters,
        block_parameters=sum(p.numel() for b in blocks for p in b.parameters()) if blocks else parameters,
        layers=len(blocks) or config.num_hidden_layers,
        hidden=hidden, heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        intermediate=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden,
        head_dim=getattr(config, "head_dim", None) or hidden // heads, vocab=config.vocab_size,
        plain_head=has_plain_head(model), head_trains_bias=getattr(head, "bias", None) is not None,
        linear_layers=linear_layers(model), block_linears=tuple(block_linears(model)),
        block=_block_structure(blocks[0], config) if blocks else LLAMA_BLOCK,
        tied_head=head.weight is model.get_input_embeddings().weight)


# For a family whose blocks HuggingFace does not name (_no_split_modules): the most common structure.
LLAMA_BLOCK = Block(attention_inputs=3, mlp_inputs=2, gated=True, norms=2, rms_norm=True, activation_tensors=1,
                    dropout_masks=0)


def _block_structure(block: torch.nn.Module, config) -> Block:
    names = {name.rsplit(".", 1)[-1] for name, _ in block.named_modules()}
    norms = [m for m in block.modules() if type(m).__name__.endswith("Norm") and
             getattr(m, "weight", None) is not None and m.weight.shape[-1] == config.hidden_size]
    activation = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    dropout = max(getattr(config, key, 0.0) or 0.0 for key in ("resid_pdrop", "hidden_dropout", "dropout"))
    return Block(attention_inputs=3 if {"q_proj", "k_proj", "v_proj"} <= names else 1,
                 mlp_inputs=2 if {"gate_proj", "up_proj"} <= names else 1,
                 gated=bool({"gate_proj", "gate_up_proj"} & names), norms=len(norms),
                 rms_norm=any("RMS" in type(m).__name__ for m in norms),
                 activation_tensors=4 if activation in PYTHON_ACTIVATIONS else 1,
                 dropout_masks=2 if dropout > 0 else 0)


@dataclass(frozen=True)
class Setup:
    """The settings of a session that decide its memory."""

    batch_size: int
    seq_len: int
    grad_accum: int = 1
    precision: str = "fp32"  # the mode picked: fp32 | bf16 | fp16
    activation_checkpointing: bool = False
    lora_r: int = 0  # 0: a full fine-tune; r: LoRA adapters of rank r on `lora_targets`, the base frozen
    lora_targets: tuple = ()  # the layer names adapted (stages/lib/modeling/lora.py); empty: every block linear (auto)
    lora_dropout: bool = False  # whether the adapters' inputs go through dropout in training
    shards: int = 1  # processes FSDP shards weights, gradients and optimizer state over
    # Rows per sample: 2 for preference pairs (a chosen and a rejected sequence). DPO's reference costs no memory of
    # its own: precomputed, or the same weights with the adapters off, run without gradients
    sequences: int = 1

    @property
    def half(self) -> bool:
        """Whether the passes compute in 16 bits."""
        return self.precision in ("bf16", "fp16")


def block_bytes_per_token(shape: ModelShape, half: bool) -> int:
    """Bytes one block keeps for the backward pass per token of the micro-batch.

    Norms compute in fp32 (RMSNorm keeps its input and the normalised values, LayerNorm its input); attention keeps
    q, k and v and a log-sum-exp per head (flash and memory-efficient kernels: no sequence x sequence scores);
    each linear keeps its input, and under autocast each linear casts a copy of its own; the MLP keeps what its
    activation and the gate's product need.
    """
    b, h, i = shape.block, shape.hidden, shape.intermediate
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    a = 2 if half else 4  # bytes of a matmul's input and output
    norms = b.norms * (2 if b.rms_norm else 1) * h * 4
    attention = (q + 2 * kv + q) * a + shape.heads * 4  # q, k, v; the output projection's input; log-sum-exp
    inputs = (b.attention_inputs + b.mlp_inputs) * h * a if half else (1 if b.parallel else 2) * h * 4
    mlp = (b.activation_tensors + (3 if b.gated else 1)) * i * a
    return norms + attention + inputs + mlp + b.dropout_masks * h


@dataclass(frozen=True)
class MemoryPlan:
    """One session's memory: the parts (bytes), the peak, and the free memory it is held against."""

    shape: ModelShape
    setup: Setup
    parts: dict
    peak: int
    available: int | None = None
    where: str = ""

    def fits(self) -> bool:
        """Whether the peak, with HEADROOM, fits in the free memory (True when that is unknown)."""
        return self.available is None or self.peak * (1 + HEADROOM) <= self.available

    def lines(self) -> list[str]:
        """The plan as printed before the first step."""
        s = self.setup
        mode = f"LoRA r={s.lora_r}, " if s.lora_r else ""
        checkpointing = "on" if s.activation_checkpointing else "off"
        sharded = f", sharded over {s.shards} processes" if s.shards > 1 else ""
        rows = f"{s.batch_size} pairs ({2 * s.batch_size} sequences)" if s.sequences == 2 else f"{s.batch_size}"
        head = (f"memory plan{' on ' + self.where if self.where else ''} ({mode}{s.precision}, micro-batch "
                f"{rows} x {s.seq_len} tokens, activation checkpointing {checkpointing}{sharded}):")
        parts = " + ".join(f"{name} {size(value)}" for name, value in self.parts.items() if value)
        verdict = ""
        if self.available is not None:
            verdict = f" of {size(self.available)} free: {'fits' if self.fits() else 'does NOT fit'}"
        return [head, f"  {parts}", f"  peak about {size(self.peak)}{verdict}"]


def size(n: float) -> str:
    """Bytes for messages: `340 KiB`, `12.5 MiB`, `44.5 GiB`."""
    for unit, scale in (("GiB", GIB), ("MiB", 2 ** 20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if n < 100 * scale else f"{n / scale:.0f} {unit}"
    return f"{n / 1024:.0f} KiB"


def plan_memory(shape: ModelShape, setup: Setup, available: int | None = None, where: str = "") -> MemoryPlan:
    """The session's memory plan (see the module docstring)."""
    s, n = setup, shape.parameters
    half, lora = setup.half, setup.lora_r > 0
    adapted = [shape.linear_layers[name] for name in s.lora_targets or shape.block_linears] if lora else []
    trained = s.lora_r * sum(inputs + outputs for inputs, outputs in adapted) if lora else n
    tokens = s.batch_size * s.seq_len * s.sequences
    a = 2 if half else 4
    lora_activations = tokens * sum(inputs * (a + 1) * s.lora_dropout + s.lora_r * a for inputs, _ in adapted)
    block = block_bytes_per_token(shape, half) * tokens + lora_activations // max(1, shape.layers)
    per_block_weights = shape.block_parameters // max(1, shape.layers)
    parts = {
        "weights": ((2 if half else 4) * n + 4 * trained if lora else 4 * n) // s.shards,
        "16-bit copies": 0 if not half or lora else 2 * (per_block_weights if s.activation_checkpointing
                                                          else shape.block_parameters),
        "gradients": 4 * trained // s.shards,
        "AdamW state": 8 * trained // s.shards,
        "activations": _activations(shape, s, block, tokens),
    }
    head_gradients, head_chunk = _loss_head(shape, s, tokens, head_trains=not lora)
    parts["loss head"] = head_gradients + head_chunk
    resident = parts["weights"] + parts["16-bit copies"] + parts["AdamW state"]
    earlier_gradients = parts["gradients"] if s.grad_accum > 1 else 0
    # The chunk of logits lives during the head's forward; the gradients in flight of one block (as big as what
    # it keeps) during the backward pass that follows.
    forward_end = resident + parts["activations"] + head_gradients + max(head_chunk, block) + earlier_gradients
    embedding_gradient = 4 * shape.vocab * shape.hidden if shape.tied_head and not lora else 0
    backward_end = resident - parts["16-bit copies"] + parts["gradients"] + embedding_gradient
    return MemoryPlan(shape, setup, parts, max(forward_end, backward_end), available, where)


def _activations(shape: ModelShape, s: Setup, block: int, tokens: int) -> int:
    outside = tokens * (2 * shape.hidden * 4 + 2 * shape.head_dim * 4)  # final norm; rotary cos and sin
    if s.activation_checkpointing:  # each block's input, and one block recomputed at a time
        return shape.layers * tokens * shape.hidden * 4 + block + outside
    return shape.layers * block + outside


def _loss_head(shape: ModelShape, s: Setup, tokens: int, head_trains: bool) -> tuple[int, int]:
    """(the gradients the head computes in the forward pass and keeps, its temporaries while it computes them)."""
    v, h = shape.vocab, shape.hidden
    a = 2 if s.half else 4
    if not shape.plain_head:  # the model's own logits, their fp32 log-softmax and its gradient
        return tokens * v * (4 + 4), tokens * v * a
    rows = min(tokens, max(1, LOGITS_PER_CHUNK // v))
    chunk = rows * v * (a + (4 + a if s.half else 0))  # the logits buffer (+ its fp32 copy and 16-bit gradient)
    gradients = tokens * h * a + (4 * v * h + (4 * v if shape.head_trains_bias else 0) if head_trains else 0)
    return gradients, chunk


def available_memory(device: torch.device) -> int:
    """Free memory for this session: the GPU's free memory, or on a CPU the RAM available (a container's limit
    included)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    free = psutil.virtual_memory().available
    room = _container_room()
    return min(free, room) if room is not None else free


def _container_room() -> int | None:
    """What a cgroup v2 memory limit leaves (None without one)."""
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else int(limit) - used


def settings_that_fit(shape: ModelShape, setup: Setup, available: int) -> list[str]:
    """The changes, one per line, that bring this session within `available` bytes; empty when none does."""
    options = []
    smaller = _largest_batch_that_fits(shape, setup, available)
    if smaller:
        options.append(_batch_advice(smaller, "", shape, available))
    if not setup.activation_checkpointing:
        checkpointed = _largest_batch_that_fits(shape, replace(setup, activation_checkpointing=True), available,
                                                smaller_only=False)
        if checkpointed:
            options.append(_batch_advice(checkpointed, "train.activation_checkpointing: true", shape, available))
    if setup.lora_r == 0:
        lora = _largest_batch_that_fits(shape, replace(setup, lora_r=LORA_RANK, lora_dropout=True,
                                                       activation_checkpointing=True), available, smaller_only=False)
        if lora:
            options.append(_batch_advice(lora, f"LoRA of rank {LORA_RANK} on the frozen base ({LORA_PARAM}: "
                                               f"{LORA_RANK}) with train.activation_checkpointing: true", shape,
                                         available))
    return options


def _largest_batch_that_fits(shape: ModelShape, setup: Setup, available: int,
                             smaller_only: bool = True) -> Setup | None:
    """The setup with the largest batch_size that fits, grad_accum raised to keep the global batch; or None."""
    per_process = setup.batch_size * setup.grad_accum
    top = setup.batch_size - 1 if smaller_only else setup.batch_size
    for size in (b for b in range(top, 0, -1) if per_process % b == 0):
        candidate = replace(setup, batch_size=size, grad_accum=per_process // size)
        if plan_memory(shape, candidate, available).fits():
            return candidate
    return None


def _batch_advice(setup: Setup, change: str, shape: ModelShape, available: int) -> str:
    batch = f"train.batch_size: {setup.batch_size}, train.grad_accum: {setup.grad_accum}"
    peak = size(plan_memory(shape, setup, available).peak)
    return f"  - {change + ', ' if change else ''}{batch} (the same global batch): about {peak}"


def does_not_fit_message(plan: MemoryPlan) -> str:
    """Why the session cannot start on this device, and what would fit."""
    shape = plan.shape
    fixed = plan.parts["weights"] + plan.parts["gradients"] + plan.parts["AdamW state"]
    per_parameter = " (16 bytes per parameter in a full fine-tune)" if not plan.setup.lora_r else ""
    lines = [f"this session needs about {size(plan.peak)} (plus {HEADROOM:.0%} headroom) on {plan.where}, which has "
             f"{size(plan.available)} free. The model has {shape.parameters:,} parameters: their weights, gradients "
             f"and AdamW state alone take {size(fixed)}{per_parameter}."]
    options = settings_that_fit(shape, plan.setup, plan.available)
    if options:
        lines += ["Settings that would fit:", *options]
    else:
        lines.append("No batch size fits, even with activation checkpointing or a LoRA: use a device with more "
                     "memory, or several GPUs with train.strategy: fsdp (train.devices), which shard weights, "
                     "gradients and optimizer state.")
    return "\n".join(lines)


def out_of_memory_message(plan: MemoryPlan, saved: str) -> str:
    """A CUDA out-of-memory error during a session that the plan said fits, as advice; `saved` says what the next
    session resumes from."""
    # The estimate fell short on this device: advise settings whose plan needs at least a third less.
    options = settings_that_fit(plan.shape, plan.setup, int(plan.peak * 2 / 3))
    advice = ["Settings that need at least a third less memory:", *options] if options else [
        "Use a device with more memory, or several GPUs with train.strategy: fsdp."]
    return "\n".join([f"{plan.where} ran out of memory during the session (the memory plan estimated "
                      f"{size(plan.peak)} of {size(plan.available)} free); {saved}.", *advice])
