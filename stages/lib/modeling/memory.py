"""The memory plan of a training session, made from the model's config before a weight is loaded: what weights,
gradients, optimizer state, activations and the loss head take, against the device's free memory, and the settings
that would fit when they do not.

Bytes per parameter (N parameters, of which T train: all of them, or a LoRA's adapters, r x (inputs + outputs) of
each layer they adapt):
- weights: fp32 master weights, 4N (a LoRA base frozen in 16 bits: 2N, plus 4T of adapters);
- 16-bit copies: under bf16/fp16 autocast each block weight is cast once per forward pass and the copy kept for the
  backward pass, 2 bytes per block parameter (one block at a time with activation checkpointing);
- gradients 4T, AdamW's two fp32 moments 8T; FSDP divides these three by the number of processes, except for the
  root it leaves whole on every process (embeddings, final norm, head), and gathers two blocks' weights at a time
  (the one computing and the one prefetched);
- a 4-bit base (train.lora.quantize: nf4, bitsandbytes' NF4 with double quantization): 0.5 bytes per weight of the
  quantized linears (the blocks'), plus one byte of constants per 64 weights and 4 bytes per 256 of those; the
  embeddings, norms and head stay in 16 bits; one linear's weight is dequantized at a time in the passes;
- 8-bit AdamW (train.optimizer: adamw8bit, bitsandbytes): two one-byte moments per parameter plus an fp32 constant
  per 256, for tensors of 4096 elements and more; smaller tensors keep fp32 moments as bitsandbytes does;
- train.lora.train_embeddings: an fp32 copy of the input embeddings and of the head trains beside the adapters
  (PEFT's modules_to_save), with its gradients and moments;
- packed documents (`packing: documents`) under sdpa: transformers builds a batch x seq x seq mask, and each layer
  keeps its own copy in the compute dtype for the backward pass (none with the flash-attention varlen path);
- activations: what autograd keeps for the backward pass, per token and block, counted from the block's structure
  (`block_bytes_per_token`, checked against what autograd really keeps in tests/test_memory.py); with activation
  checkpointing, each block's input (fp32, 4 x hidden per token) and one block recomputed at a time; a LoRA adds,
  per adapted layer and token, its dropout's output and mask (inputs x (2 or 4 bytes + 1)) and A's output (r);
- the loss head (stages/lib/modeling/loss.py): its gradients, computed in the forward pass (the head weight's 4 x vocab
  x hidden, the hidden states' gradient), and one chunk of logits; a model without a plain head holds full logits.
The peak is the larger of two moments: the end of the forward pass (activations and head gradients, plus the larger
of the head's chunk of logits and the gradients in flight through the last block's MLP as the backward pass
starts; gradients of earlier micro-steps when grad_accum > 1) and the end of the backward pass (all gradients). A
plan fits when its peak plus HEADROOM is within the free memory. Checked against what PyTorch allocates by
bench/bench_memory.py and tests/test_memory_plan_peak.py. Under FSDP a save gathers the full state (weights,
optimizer state) to rank 0's host RAM: `gather_bytes`, checked against the RAM available before the first step.
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
NF4_BLOCK, NF4_CONSTANTS_BLOCK = 64, 256  # bitsandbytes: weights per 4-bit block; blocks per double-quantized block
ADAM8_BLOCK, ADAM8_SMALLEST = 256, 4096  # bitsandbytes' 8-bit AdamW: values per block; smaller tensors keep fp32


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
    parameter_sizes: tuple = ()  # elements of each parameter (tied ones once): what an 8-bit optimizer blocks
    block_linear_sizes: tuple = ()  # (name, inputs, outputs) of each linear inside the blocks: what nf4 quantizes
    embedding_parameters: int = 0  # input embeddings, and the head when it is not tied to them
    root_parameters: int = 0  # outside the blocks (embeddings, final norm, head): FSDP's root, never sharded

    @property
    def quantized_parameters(self) -> int:
        """Weights a 4-bit base holds in NF4: the blocks' linears."""
        return sum(inputs * outputs for _, inputs, outputs in self.block_linear_sizes)


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
        tied_head=head.weight is model.get_input_embeddings().weight,
        parameter_sizes=tuple(p.numel() for p in model.parameters()),
        block_linear_sizes=_block_linear_sizes(blocks),
        embedding_parameters=sum({id(m.weight): m.weight.numel()
                                  for m in (model.get_input_embeddings(), head)}.values()),
        root_parameters=parameters - sum(p.numel() for b in blocks for p in b.parameters()) if blocks else 0)


def _block_linear_sizes(blocks: list) -> tuple:
    def features(module):  # (inputs, outputs); GPT-2's Conv1D holds its weight transposed
        rows, columns = module.weight.shape
        return (rows, columns) if type(module).__name__ == "Conv1D" else (columns, rows)
    return tuple((name.rsplit(".", 1)[-1], *features(m)) for block in blocks for name, m in block.named_modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D")


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
    quantize: str = "none"  # train.lora.quantize: none | nf4 (the frozen base in 4 bits)
    optimizer: str = "adamw"  # train.optimizer: adamw | adamw8bit
    train_embeddings: bool = False  # train.lora.train_embeddings: embeddings and head train beside the adapters
    document_mask: bool = False  # packed documents under sdpa: a batch x seq x seq mask kept by each layer
    # Rows per sample: 2 for preference pairs (a chosen and a rejected sequence). DPO's reference costs no memory of
    # its own: precomputed, or the same weights with the adapters off, run without gradients
    sequences: int = 1

    @property
    def half(self) -> bool:
        """Whether the passes compute in 16 bits."""
        return self.precision in ("bf16", "fp16")


def plan_settings(train, document_mask: bool = False) -> dict:
    """The Setup fields train params decide beside LoRA's (lora.checked_plan_settings): the 4-bit base, the
    optimizer, trained embeddings; `document_mask`: packed documents under sdpa."""
    lora = train.lora.r > 0
    return {"quantize": train.lora.quantize if lora else "none", "optimizer": train.optimizer,
            "train_embeddings": lora and train.lora.train_embeddings, "document_mask": document_mask}


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
        mode = f"LoRA r={s.lora_r}{' on a 4-bit base (nf4)' if s.quantize == 'nf4' else ''}, " if s.lora_r else ""
        mode += "embeddings and head training, " if s.lora_r and s.train_embeddings else ""
        mode += "8-bit AdamW, " if s.optimizer == "adamw8bit" else ""
        mode += "packed documents, " if s.document_mask else ""
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
    s = setup
    half, lora = setup.half, setup.lora_r > 0
    adapted = [shape.linear_layers[name] for name in s.lora_targets or shape.block_linears] if lora else []
    trained_sizes = _trained_sizes(shape, s)
    trained = sum(trained_sizes)
    tokens = s.batch_size * s.seq_len * s.sequences
    a = 2 if half else 4
    lora_activations = tokens * sum(inputs * (a + 1) * s.lora_dropout + s.lora_r * a for inputs, _ in adapted)
    block = block_bytes_per_token(shape, half) * tokens + lora_activations // max(1, shape.layers)
    block += _document_mask(s) if s.document_mask else 0
    per_block_weights = shape.block_parameters // max(1, shape.layers)
    root = shape.root_parameters if s.shards > 1 else 0  # FSDP's root stays whole on every process
    root_trained = root if not lora else (shape.embedding_parameters if s.train_embeddings and s.shards > 1 else 0)
    optimizer = _optimizer_bytes(trained_sizes, s.optimizer)
    parts = {
        "weights": _weights(shape, s, trained, root),
        "16-bit copies": 0 if not half or lora else 2 * (per_block_weights if s.activation_checkpointing
                                                          else shape.block_parameters),
        "gradients": _sharded(4 * trained, 4 * root_trained, s.shards),
        "AdamW state": _sharded(optimizer, optimizer * root_trained // max(1, trained), s.shards),
        "activations": _activations(shape, s, block, tokens),
        "FSDP gathered blocks": 2 * per_block_weights * (2 if half else 4) if s.shards > 1 else 0,
    }
    head_trains = not lora or s.train_embeddings
    head_gradients, head_chunk = _loss_head(shape, s, tokens, head_trains=head_trains)
    parts["loss head"] = head_gradients + head_chunk
    # A 4-bit base's linear is dequantized for its matmul (forward and backward), one at a time.
    dequantized = a * max((i * o for _, i, o in shape.block_linear_sizes), default=0) if s.quantize == "nf4" else 0
    resident = parts["weights"] + parts["16-bit copies"] + parts["AdamW state"] + parts["FSDP gathered blocks"]
    earlier_gradients = parts["gradients"] if s.grad_accum > 1 else 0
    # The chunk of logits lives during the head's forward; the gradients in flight through the last block's MLP
    # (the hidden state's, and those of the gate's and up-projection's outputs) during the backward pass that
    # follows, as what that block kept is freed.
    in_flight = tokens * (shape.hidden + 2 * shape.intermediate) * a
    forward_end = (resident + parts["activations"] + head_gradients + max(head_chunk, in_flight + dequantized)
                   + earlier_gradients)
    embedding_gradient = 4 * shape.vocab * shape.hidden if shape.tied_head and head_trains else 0
    backward_end = resident - parts["16-bit copies"] + parts["gradients"] + embedding_gradient + dequantized
    return MemoryPlan(shape, setup, parts, max(forward_end, backward_end), available, where)


def _trained_sizes(shape: ModelShape, s: Setup) -> list[int]:
    """Elements of each tensor that trains: every parameter, or a LoRA's A (r x inputs) and B (outputs x r) on each
    adapted layer, and with train_embeddings the embeddings and head."""
    if not s.lora_r:
        return list(shape.parameter_sizes) or [shape.parameters]
    targets = set(s.lora_targets or shape.block_linears)
    instances = [(i, o) for name, i, o in shape.block_linear_sizes if name in targets]
    in_blocks = {name for name, _, _ in shape.block_linear_sizes}
    instances += [shape.linear_layers[name] for name in sorted(targets - in_blocks)]  # the head, say: one tensor
    sizes = [size for i, o in instances for size in (s.lora_r * i, s.lora_r * o)]
    return sizes + ([shape.embedding_parameters] if s.train_embeddings else [])


def _optimizer_bytes(sizes: list[int], optimizer: str) -> int:
    """AdamW's two moments: fp32 (8 bytes per parameter), or bitsandbytes' 8-bit blocks for tensors large enough."""
    if optimizer != "adamw8bit":
        return 8 * sum(sizes)
    blockwise = [n for n in sizes if n >= ADAM8_SMALLEST]
    constants = sum(2 * 4 * -(-n // ADAM8_BLOCK) + 2 * 256 * 4 for n in blockwise)  # absmax and the quantile map
    return 2 * sum(blockwise) + constants + 8 * (sum(sizes) - sum(blockwise))


def _weights(shape: ModelShape, s: Setup, trained: int, root: int) -> int:
    """Weights held: fp32 masters (a full fine-tune), or the frozen base (16 bits under half precision, its block
    linears in NF4 when quantized) and the fp32 tensors that train beside it."""
    if not s.lora_r:
        return _sharded(4 * shape.parameters, 4 * root, s.shards)
    base = 2 if s.half else 4
    if s.quantize == "nf4":
        q = shape.quantized_parameters
        constants = -(-q // NF4_BLOCK) + 4 * -(-q // (NF4_BLOCK * NF4_CONSTANTS_BLOCK))
        frozen = q // 2 + constants + base * (shape.parameters - q)
    else:
        frozen = base * shape.parameters
    return _sharded(frozen + 4 * trained, base * root, s.shards)


def _sharded(total: int, whole: int, shards: int) -> int:
    """What one process holds of `total` bytes when FSDP shards all but `whole` of them."""
    return total if shards <= 1 else (total - whole) // shards + whole


def _document_mask(s: Setup) -> int:
    """The attention mask one layer keeps for packed documents under sdpa: batch x seq x seq in the compute
    dtype (transformers builds it in bools; the kernel takes it as an additive mask)."""
    return s.batch_size * s.seq_len * s.seq_len * (2 if s.half else 4)


def gather_bytes(shape: ModelShape, s: Setup) -> int:
    """Host RAM rank 0 needs to gather the full state at a save under FSDP: the fp32 weights that train (or the
    adapters) and their optimizer state; 0 on one process."""
    if s.shards <= 1:
        return 0
    sizes = _trained_sizes(shape, s)
    return 4 * sum(sizes) + _optimizer_bytes(sizes, s.optimizer)


def _activations(shape: ModelShape, s: Setup, block: int, tokens: int) -> int:
    outside = tokens * (2 * shape.hidden * 4 + 2 * shape.head_dim * 4)  # final norm; rotary cos and sin
    if s.document_mask:  # the bool mask the model builds, kept as every checkpointed block's input
        outside += s.batch_size * s.seq_len * s.seq_len if s.activation_checkpointing else 0
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


def gather_short_message(shape: ModelShape, setup: Setup, host_available: int) -> str | None:
    """Why a save under FSDP would run rank 0's host out of RAM (None when it fits): a save gathers the full
    state there."""
    needed = gather_bytes(shape, setup)
    if not needed or needed * (1 + HEADROOM) <= host_available:
        return None
    return (f"a save gathers the full state (the fp32 weights that train and their optimizer state, "
            f"{size(needed)}) into the host RAM of the first process, which has {size(host_available)} available: "
            "the session would fail at its first save. Use a machine with more RAM, or a LoRA (train.lora.r), "
            "whose checkpoint holds only the adapters")


def measured_peak(device: torch.device) -> tuple[int, str]:
    """(bytes, what they are) of the most memory this process has held: on a GPU what tensors held
    (torch.cuda.max_memory_allocated, what the plan estimates); on a CPU the peak resident memory, which adds the
    interpreter, the libraries and what the C allocator keeps after tensors are freed."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "allocated by tensors"
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak resident memory of the process"


def measured_line(plan: MemoryPlan, measured: int, what: str) -> str:
    """The peak measured after the first steps beside the plan's figure, so a plan that is off shows."""
    return (f"memory after the first steps: {size(measured)} ({what}); the memory plan said {size(plan.peak)} "
            f"({measured / plan.peak:.2f}x)")


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
    if setup.lora_r == 0 and setup.optimizer != "adamw8bit" and not options:
        eight_bit = _largest_batch_that_fits(
            shape, replace(setup, optimizer="adamw8bit", activation_checkpointing=True), available, smaller_only=False)
        if eight_bit:
            options.append(_batch_advice(eight_bit, "train.optimizer: adamw8bit with train.activation_checkpointing: "
                                                    "true", shape, available))
    lora = None
    if setup.lora_r == 0:
        lora = _largest_batch_that_fits(shape, replace(setup, lora_r=LORA_RANK, lora_dropout=True,
                                                       activation_checkpointing=True), available, smaller_only=False)
        if lora:
            options.append(_batch_advice(lora, f"LoRA of rank {LORA_RANK} on the frozen base ({LORA_PARAM}: "
                                               f"{LORA_RANK}) with train.activation_checkpointing: true", shape,
                                         available))
    if setup.quantize != "nf4" and not lora and not (setup.lora_r and options):
        # The 16-bit base is what does not fit: hold it in 4 bits (QLoRA).
        qlora = _largest_batch_that_fits(shape, replace(setup, lora_r=setup.lora_r or LORA_RANK, quantize="nf4",
                                                        lora_dropout=setup.lora_dropout or not setup.lora_r,
                                                        activation_checkpointing=True), available, smaller_only=False)
        if qlora:
            change = "train.lora.quantize: nf4 (the frozen base in 4 bits)"
            change += f" with {LORA_PARAM}: {LORA_RANK}" if not setup.lora_r else ""
            options.append(_batch_advice(qlora, change + " and train.activation_checkpointing: true", shape,
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
        lines.append("No batch size fits, even with activation checkpointing or a LoRA on a 4-bit base: use a "
                     "device with more memory, or several GPUs with train.strategy: fsdp (train.devices), which shard "
                     "weights, gradients and optimizer state.")
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
