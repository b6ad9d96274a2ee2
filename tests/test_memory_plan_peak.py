"""The memory plan against the peak memory tensors really hold through two training steps of a tiny Llama: a full
fine-tune with AdamW and with bitsandbytes' 8-bit AdamW, a LoRA, and a LoRA on a 4-bit base (QLoRA, loaded as
transformers and PEFT do), with stream and documents packing; and Llama-3.1-8B on a 15 GiB T4 from its config."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from stages import memory_plan
from stages.lib.base.params import LoraParams
from stages.lib.modeling import lora, memory
from stages.lib.modeling.loss import LossModule
from stages.lib.modeling.memory import GIB, Setup, model_shape, plan_memory, settings_that_fit

TINY_LLAMA = {"vocab_size": 512, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
              "tie_word_embeddings": False}
LLAMA_3_1_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 8192}}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # what `auto` adapts
MODES = {  # mode -> the plan's settings
    "full": {},
    "full, 8-bit AdamW": {"optimizer": "adamw8bit"},
    "LoRA": {"lora_r": 8, "lora_dropout": True},
    "QLoRA": {"lora_r": 8, "lora_dropout": True, "quantize": "nf4"},
}


def tiny_model(mode: str, folder) -> torch.nn.Module:
    """The tiny Llama as a session of `mode` trains it (fp32 on the CPU)."""
    torch.manual_seed(0)
    config = LlamaConfig(**TINY_LLAMA)
    if MODES[mode].get("quantize") != "nf4":
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    else:
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=nf4, device_map="cpu",
                                                     dtype=torch.float32, attn_implementation="sdpa")
    if MODES[mode].get("quantize") == "nf4":  # PEFT's own way onto bitsandbytes' 4-bit layers
        from peft import LoraConfig, inject_adapter_in_model
        inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=list(LLAMA_LINEARS)),
                                model)
    elif MODES[mode].get("lora_r"):
        lora.add_adapters(model, LoraParams(r=8, dropout=0.1))
    return model.train()


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors (each storage once), a 4-bit weight's quantization constants included."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        state = getattr(tensor, "quant_state", None)
        for part in (state, getattr(state, "state2", None)) if state is not None else ():
            for value in (part.absmax, part.code, getattr(part, "offset", None)):
                if isinstance(value, torch.Tensor):
                    storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def peak_of_two_steps(model: torch.nn.Module, mode: str, batch: int, seq_len: int, documents: bool) -> int:
    """The most bytes tensors held at once through two optimizer steps (from the profiler's allocation events),
    the model's own tensors included."""
    torch.manual_seed(1)
    tokens = torch.randint(0, TINY_LLAMA["vocab_size"], (batch, seq_len))
    positions = torch.arange(seq_len).remainder(seq_len // 4 + 5).expand(batch, -1) if documents else None
    trained = [p for p in model.parameters() if p.requires_grad]
    loss_module = LossModule(model)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        if MODES[mode].get("optimizer") == "adamw8bit":
            import bitsandbytes
            optimizer = bitsandbytes.optim.AdamW8bit(trained, lr=1e-3)
        else:
            optimizer = torch.optim.AdamW(trained, lr=1e-3, fused=True)
        for _ in range(2):
            loss_module(tokens, tokens, positions).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return held_bytes(model) + peak


@pytest.mark.parametrize("batch, seq_len", [(2, 512), (1, 2048)])
@pytest.mark.parametrize("packing", ["stream", "documents"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_plan_is_within_15_percent_of_the_peak_tensors_hold(mode, packing, batch, seq_len, tmp_path):
    model = tiny_model(mode, tmp_path / "base")
    measured = peak_of_two_steps(model, mode, batch, seq_len, packing == "documents")
    plan = plan_memory(model_shape(LlamaConfig(**TINY_LLAMA)),
                       Setup(batch, seq_len, document_mask=packing == "documents", **MODES[mode]))
    assert plan.peak == pytest.approx(measured, rel=0.15), (plan.parts, measured)


def test_the_document_mask_is_what_the_plan_of_packed_documents_adds():
    shape = model_shape(LlamaConfig(**TINY_LLAMA))
    stream, documents = (plan_memory(shape, Setup(2, 1024, document_mask=mask)) for mask in (False, True))
    added = documents.parts["activations"] - stream.parts["activations"]
    assert added == 2 * (2 * 1024 * 1024 * 4)  # one fp32 batch x seq x seq mask per layer
    checkpointed = [plan_memory(shape, Setup(2, 1024, document_mask=mask, activation_checkpointing=True))
                    for mask in (False, True)]
    # With activation checkpointing: the bool mask every block receives, and one block's copy at a time.
    assert checkpointed[1].parts["activations"] - checkpointed[0].parts["activations"] == 2 * 1024 * 1024 * 5


def test_the_4_bit_base_and_8_bit_moments_cost_what_bitsandbytes_holds():
    shape = model_shape(LlamaConfig(**LLAMA_3_1_8B))
    assert shape.parameters == 8_030_261_248
    quantized = shape.quantized_parameters  # the blocks' linears; embeddings, norms and head stay in 16 bits
    assert quantized == shape.block_parameters - 32 * 2 * 4096
    qlora = plan_memory(shape, Setup(1, 2048, precision="fp16", lora_r=16, quantize="nf4"))
    adapters = qlora.parts["gradients"] // 4
    frozen = qlora.parts["weights"] - 4 * adapters
    assert frozen == pytest.approx(quantized * (0.5 + 1 / 64 + 4 / 64 / 256) + 2 * (shape.parameters - quantized),
                                   abs=8)
    full = plan_memory(shape, Setup(1, 2048, precision="fp16"))
    eight_bit = plan_memory(shape, Setup(1, 2048, precision="fp16", optimizer="adamw8bit"))
    assert full.parts["AdamW state"] == 8 * shape.parameters
    assert eight_bit.parts["AdamW state"] == pytest.approx(2.03 * shape.parameters, rel=0.01)


def test_llama_3_1_8b_qlora_fits_a_t4_and_what_does_not_fit_is_named(tmp_path, capsys):
    shape, t4 = model_shape(LlamaConfig(**LLAMA_3_1_8B)), 15 * GIB
    qlora = Setup(1, 2048, precision="fp16", activation_checkpointing=True, lora_r=16, lora_dropout=True,
                  quantize="nf4")
    assert plan_memory(shape, qlora, t4).fits()
    full = Setup(1, 2048, precision="fp16", activation_checkpointing=True)
    assert not plan_memory(shape, full, t4).fits()
    lora_16_bit = Setup(1, 2048, precision="fp16", activation_checkpointing=True, lora_r=16, lora_dropout=True)
    assert not plan_memory(shape, lora_16_bit, t4).fits()
    advice = settings_that_fit(shape, lora_16_bit, t4)
    assert len(advice) == 1 and "train.lora.quantize: nf4" in advice[0]
    assert "nf4" in " ".join(settings_that_fit(shape, full, t4))

    LlamaConfig(**LLAMA_3_1_8B).save_pretrained(tmp_path / "llama-3.1-8b")
    memory_plan.main(["--config", str(tmp_path / "llama-3.1-8b"), "--gib", "15", "--lora-r", "16",
                      "--quantize", "nf4"])
    out = capsys.readouterr().out
    assert "(LoRA r=16 on a 4-bit base (nf4), fp16, micro-batch 1 x 2048 tokens, activation checkpointing on)" in out
    assert ": fits" in out and "does NOT fit" not in out
    memory_plan.main(["--config", str(tmp_path / "llama-3.1-8b"), "--gib", "15", "--lora-r", "16",
                      "--activation-checkpointing"])
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "train.lora.quantize: nf4 (the frozen base in 4 bits)" in out
    memory_plan.main(["--config", str(tmp_path / "llama-3.1-8b"), "--gib", "15", "--optimizer", "adamw8bit"])
    out = capsys.readouterr().out
    assert "8-bit AdamW" in out and "does NOT fit" in out and "train.lora.quantize: nf4" in out
    assert memory.size(plan_memory(shape, qlora).peak) in " ".join(settings_that_fit(shape, full, t4))


def test_fsdp_leaves_the_root_whole_and_a_save_gathers_the_full_state_in_rank_0s_ram():
    shape = model_shape(LlamaConfig(**LLAMA_3_1_8B))
    n, root = shape.parameters, shape.root_parameters
    assert root == 2 * 128256 * 4096 + 4096  # embeddings, head, final norm
    alone, sharded = (plan_memory(shape, Setup(1, 2048, precision="bf16", shards=shards)) for shards in (1, 4))
    assert sharded.parts["weights"] == 4 * (n - root) // 4 + 4 * root
    assert sharded.parts["AdamW state"] == 8 * (n - root) // 4 + 8 * root
    assert sharded.parts["FSDP gathered blocks"] == 2 * 2 * shape.block_parameters // 32  # this block and the next
    assert alone.parts["FSDP gathered blocks"] == 0
    assert memory.gather_bytes(shape, alone.setup) == 0
    assert memory.gather_bytes(shape, sharded.setup) == 12 * n  # fp32 weights and two fp32 moments
    message = memory.gather_short_message(shape, sharded.setup, 64 * GIB)
    assert "gathers the full state" in message and memory.size(12 * n) in message and "64.0 GiB available" in message
    assert memory.gather_short_message(shape, sharded.setup, 128 * GIB) is None
    qlora = Setup(1, 2048, precision="bf16", shards=4, lora_r=16, quantize="nf4")
    assert memory.gather_short_message(shape, qlora, 4 * GIB) is None  # the adapters alone
