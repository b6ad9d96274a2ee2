"""The memory plan: its activation estimate against what autograd really keeps, phi-2 on a 15 GiB T4 from its config
alone, a session that does not fit stopping before it trains with settings that would, and a CUDA out-of-memory
error turned into the same advice with the checkpoint left whole."""

import contextlib

import pytest
import torch
from test_families import base_model
from train_helpers import (
    EOS_ID,
    PAD_ID,
    REPO,
    TINY,
    VOCAB,
    checkpoint_step,
    inside,
    make_workspace,
    read_tsv,
    session,
    write_params,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
)

from stages import memory_plan
from stages.lib.base.errors import UserError
from stages.lib.base.params import LoraParams, ModelParams
from stages.lib.modeling import lora, memory
from stages.lib.modeling.families import new_model_config
from stages.lib.modeling.loss import LossModule
from stages.lib.modeling.memory import GIB, Setup, model_shape, plan_memory, settings_that_fit

SMALL = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3,
         "num_attention_heads": 4, "max_position_embeddings": 256}
FAMILIES = {
    "llama": lambda: LlamaConfig(**SMALL, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),
    "phi": lambda: PhiConfig(**{**SMALL, "hidden_size": 160}, partial_rotary_factor=0.4, resid_pdrop=0.1),
    "gpt2": lambda: GPT2Config(vocab_size=512, n_embd=128, n_layer=3, n_head=4, n_positions=256, attn_pdrop=0.0),
}
PHI_2 = {"vocab_size": 51200, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
         "num_attention_heads": 32, "max_position_embeddings": 2048, "partial_rotary_factor": 0.4,
         "resid_pdrop": 0.1, "hidden_act": "gelu_new", "tie_word_embeddings": False}


def kept_for_backward(config, precision: str, batch: int = 4, seq_len: int = 128, model=None) -> int:
    """Bytes autograd keeps for the backward pass of one micro-batch, parameters excepted (each storage once), for
    a random model of `config` (or `model`)."""
    torch.manual_seed(0)
    model = model or AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, config.vocab_size, (batch, seq_len))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        LossModule(model)(tokens, tokens)
    return sum(kept.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_activation_estimate_matches_what_autograd_keeps(family, precision):
    config = FAMILIES[family]()
    plan = plan_memory(model_shape(config), Setup(4, 128, precision=precision))
    estimate = plan.parts["activations"] + plan.parts["16-bit copies"]  # autocast's weight copies are kept too
    assert estimate == pytest.approx(kept_for_backward(config, precision), rel=0.15)


def test_phi_2s_shape_from_its_config_alone():
    shape = model_shape(PhiConfig(**PHI_2))
    assert shape.parameters == 2_779_683_840 and shape.layers == 32
    assert shape.plain_head and shape.head_trains_bias and not shape.tied_head
    assert shape.block.parallel and not shape.block.gated and shape.block.activation_tensors == 4


def test_phi_2_full_fine_tune_does_not_fit_a_t4_at_any_batch_size_and_lora_does():
    shape, t4 = model_shape(PhiConfig(**PHI_2)), 15 * GIB
    full = plan_memory(shape, Setup(4, 2048, grad_accum=4, precision="fp16"), t4, "a T4")
    assert not full.fits()
    fixed = full.parts["weights"] + full.parts["gradients"] + full.parts["AdamW state"]
    assert fixed == 16 * shape.parameters  # fp32 weights and gradients, two fp32 AdamW moments
    advice = settings_that_fit(shape, full.setup, t4)
    assert len(advice) == 1 and "LoRA of rank 16" in advice[0]  # no batch size, no checkpointing is enough
    assert "(train.lora.r: 16) with train.activation_checkpointing: true" in advice[0]
    assert "train.batch_size: 4, train.grad_accum: 4" in advice[0]
    lora = plan_memory(shape, Setup(4, 2048, grad_accum=4, precision="fp16", activation_checkpointing=True,
                                    lora_r=16), t4)
    assert lora.fits() and lora.parts["weights"] < 6 * GIB  # a 16-bit base and fp32 adapters
    # An 80 GiB A100 holds the full fine-tune in bf16, with activation checkpointing.
    a100 = Setup(4, 2048, grad_accum=4, precision="bf16", activation_checkpointing=True)
    assert plan_memory(shape, a100, 80 * GIB).fits()
    assert not plan_memory(shape, Setup(4, 2048, grad_accum=4, precision="bf16"), 80 * GIB).fits()


def test_the_readmes_phi_2_table_is_what_the_plan_computes():
    shape, readme = model_shape(PhiConfig(**PHI_2)), (REPO / "README.md").read_text()
    rows = [("T4, 15 GiB", 15, Setup(1, 2048, precision="fp16"), "does not fit"),
            ("T4, 15 GiB", 15, Setup(1, 2048, precision="fp16", activation_checkpointing=True), "does not fit"),
            ("T4, 15 GiB", 15, Setup(4, 2048, precision="fp16", activation_checkpointing=True, lora_r=16,
                                     lora_dropout=True), "fits"),
            ("A100, 40 GiB", 40, Setup(4, 2048, precision="bf16", activation_checkpointing=True), "does not fit"),
            ("A100/H100, 80 GiB", 80, Setup(1, 2048, precision="bf16"), "fits"),
            ("A100/H100, 80 GiB", 80, Setup(16, 2048, precision="bf16", activation_checkpointing=True), "fits")]
    for gpu, gib, setup, verdict in rows:
        plan = plan_memory(shape, setup, gib * GIB)
        line = next(line for line in readme.splitlines() if line.startswith(f"| {gpu} |") and
                    f"batch {setup.batch_size}" in line and ("checkpointing" in line) == setup.activation_checkpointing)
        assert f"| {memory.size(plan.peak)} | {verdict}" in line, line
        assert plan.fits() == (verdict == "fits")


def test_each_setting_that_saves_memory_shrinks_the_plan():
    shape = model_shape(LlamaConfig(**SMALL))
    base = plan_memory(shape, Setup(8, 128)).peak
    assert plan_memory(shape, Setup(4, 128, grad_accum=2)).peak < base
    assert plan_memory(shape, Setup(8, 128, activation_checkpointing=True)).peak < base
    assert plan_memory(shape, Setup(8, 128, lora_r=8)).peak < base
    assert plan_memory(shape, Setup(8, 128, shards=2)).peak < base


def test_a_micro_batch_of_pairs_plans_two_sequences_per_pair():
    shape = model_shape(LlamaConfig(**SMALL))
    pairs = plan_memory(shape, Setup(4, 128, sequences=2))
    assert pairs.parts == plan_memory(shape, Setup(8, 128)).parts
    assert "micro-batch 4 pairs (8 sequences) x 128 tokens" in pairs.lines()[0]


def test_the_memory_plan_command_prints_phi_2_on_a_t4_from_its_config(tmp_path, capsys):
    PhiConfig(**PHI_2).save_pretrained(tmp_path / "phi-2")
    memory_plan.main(["--config", str(tmp_path / "phi-2"), "--precision", "fp16", "--gib", "15", "--batch-size",
                      "4"])
    out = capsys.readouterr().out
    assert "(fp16, micro-batch 4 x 2048 tokens, activation checkpointing off)" in out
    assert "does NOT fit" in out and "2,779,683,840 parameters" in out and "take 41.4 GiB" in out
    assert "LoRA of rank 16 on the frozen base (train.lora.r: 16)" in out
    with pytest.raises(UserError, match=r"--config .*no config\.json"):
        memory_plan.main(["--config", str(tmp_path / "nowhere")])
    lora = ["--precision", "fp16", "--gib", "15", "--batch-size", "4", "--lora-r", "16", "--activation-checkpointing"]
    memory_plan.main(["--config", str(tmp_path / "phi-2"), *lora])
    out = capsys.readouterr().out
    assert "(LoRA r=16, fp16, micro-batch 4 x 2048 tokens, activation checkpointing on)" in out
    assert "fits" in out and "does NOT fit" not in out
    readme = (REPO / "README.md").read_text()
    shown = readme.split("$ python -m stages.memory_plan --config pretrained/phi-2", 1)[1].split("```", 1)[0]
    assert shown.splitlines()[0].split() == lora  # the README's command and what it prints
    assert shown.splitlines()[1:] == out.splitlines()


def test_the_memory_plan_command_plans_the_lora_params_yaml_describes(tmp_path, capsys):
    base_model("qwen2", tmp_path / "base")
    root = make_workspace(tmp_path / "w", init_from=str(tmp_path / "base"),
                          lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    with inside(root):
        memory_plan.main([])
    out = capsys.readouterr().out
    shape = model_shape(AutoConfig.from_pretrained(tmp_path / "base"))
    adapters = 4 * sum(sum(shape.linear_layers[name]) for name in ("q_proj", "v_proj"))
    assert "(LoRA r=4, fp32, micro-batch 4 x 16 tokens" in out
    assert f"gradients {memory.size(4 * adapters)}" in out
    with inside(root), pytest.raises(UserError, match=r"'o_prj' is no linear layer of this model"):
        write_params(root, init_from=str(tmp_path / "base"), lora={"r": 4, "target_modules": ["o_prj"]})
        memory_plan.main([])


def tiny_plan(**setup) -> memory.MemoryPlan:
    config = new_model_config(ModelParams(**TINY["model"]), VOCAB, {"eos_token_id": EOS_ID, "pad_token_id": PAD_ID})
    return plan_memory(model_shape(config), Setup(seq_len=TINY["seq_len"], **setup))


def test_a_session_that_does_not_fit_stops_before_training_and_names_settings_that_do(tmp_path, monkeypatch,
                                                                                      capsys):
    needs = {b: tiny_plan(batch_size=b, grad_accum=4 // b).peak * (1 + memory.HEADROOM) for b in (4, 2, 1)}
    monkeypatch.setattr(memory, "available_memory", lambda device: int((needs[4] + needs[2]) / 2))
    root = make_workspace(tmp_path)
    with pytest.raises(UserError, match=r"needs about .* which has .* free(.|\n)*Settings that would fit:\n"
                                        r"  - train\.batch_size: 2, train\.grad_accum: 2 \(the same global batch\)"):
        session(root)
    assert "does NOT fit" in capsys.readouterr().out
    assert not any((root / folder).exists() for folder in ("checkpoints", "outputs", "models"))
    result = session(root, batch_size=2, grad_accum=2)  # the advice: same global batch, so the same run
    assert result.end_step == 12 and "memory plan on cpu" in capsys.readouterr().out


def test_an_out_of_memory_error_becomes_advice_and_leaves_the_checkpoint_whole(tmp_path, monkeypatch):
    root = make_workspace(tmp_path)
    session(root, steps_today=4)
    forward, calls = LossModule.forward, []

    def runs_out_at_the_third_step(self, *batch):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(self, *batch)

    monkeypatch.setattr(LossModule, "forward", runs_out_at_the_third_step)
    with pytest.raises(UserError, match=r"ran out of memory during the session \(the memory plan estimated .*\); "
                                        r"the checkpoint at step 4 in checkpoints is untouched"):
        session(root, steps_today=4)
    assert [p.name for p in (root / "checkpoints").iterdir()] == ["step-00000004"]
    monkeypatch.setattr(LossModule, "forward", forward)
    assert session(root, steps_today=2).start_step == 4
    assert checkpoint_step(root) == 6


def with_adapters(config, dtype: torch.dtype, targets="auto", dropout: float = 0.1):
    """A random model of `config` held in `dtype` with rank-8 LoRA adapters, as a LoRA session builds it."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(dtype)
    return lora.add_adapters(model, LoraParams(r=8, dropout=dropout, target_modules=targets)).train()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_loras_activation_estimate_matches_what_autograd_keeps_on_its_frozen_base(family, precision):
    config = FAMILIES[family]()
    model = with_adapters(config, torch.bfloat16 if precision == "bf16" else torch.float32)
    plan = plan_memory(model_shape(config), Setup(4, 128, precision=precision, lora_r=8, lora_dropout=True))
    assert plan.parts["16-bit copies"] == 0  # the base is held in 16 bits already
    assert plan.parts["activations"] == pytest.approx(kept_for_backward(config, precision, model=model), rel=0.15)


@pytest.mark.parametrize("family, targets", [("llama", "auto"), ("llama", ["q_proj", "v_proj"]), ("gpt2", "auto"),
                                             ("gpt2", ["c_attn"])])  # GPT-2's Conv1D layers: PEFT's fan_in_fan_out
def test_the_plan_counts_the_adapters_peft_creates(family, targets):
    config = FAMILIES[family]()
    model = with_adapters(config, torch.float32, targets)
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shape = model_shape(config)
    names = lora.target_modules(targets, shape.linear_layers, list(shape.block_linears))
    plan = plan_memory(shape, Setup(4, 128, lora_r=8, lora_targets=tuple(names)))
    assert plan.parts["gradients"] == 4 * adapters and plan.parts["AdamW state"] == 8 * adapters
    assert plan.parts["weights"] == 4 * (shape.parameters + adapters)


def test_each_session_prints_and_logs_the_memory_it_took_beside_the_plan(tmp_path, capsys):
    root = make_workspace(tmp_path)
    session(root, steps_today=6)
    out = capsys.readouterr().out
    plan = tiny_plan(batch_size=TINY["batch_size"], grad_accum=TINY.get("grad_accum", 1))
    line = next(line for line in out.splitlines() if "memory after the first steps:" in line)
    assert "(peak resident memory of the process); the memory plan said" in line
    assert f"said {memory.size(plan.peak)}" in line
    (step, peak), = read_tsv(root, "memory/peak_gib")
    (_, planned), = read_tsv(root, "memory/plan_gib")
    assert step == 5 and float(peak) > 0.1 and float(planned) == round(plan.peak / GIB, 3)
