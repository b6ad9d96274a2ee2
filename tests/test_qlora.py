"""QLoRA (train.lora.quantize: nf4) on a tiny random Llama: the base is held in 4 bits through bitsandbytes (its
CPU backend), three sessions equal one bitwise with grad_accum, activation checkpointing and packed documents, the
checkpoint holds the adapters alone, the exports fold the adapters into the base as its files hold it, and 4 bits
are part of the run's identity."""

import json

import pytest
import torch
import yaml
from peft import PeftModel
from test_families import base_model
from test_lora import LORA, SAME_RUN_FILES, lora_run
from train_helpers import VOCAB, make_workspace, session, tree_bytes
from transformers import AutoModelForCausalLM

from stages.lib.base.errors import UserError
from stages.lib.base.params import ParamError, load_params
from stages.lib.modeling import lora
from stages.lib.modeling.families import pretrained_model
from stages.lib.modeling.inference import load_model

QLORA = {**LORA, "quantize": "nf4"}


def logits(model, tokens):
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def four_bit_base(folder):
    """The base as a QLoRA session holds it on this CPU: its linear layers in 4 bits, computing in fp32."""
    model = pretrained_model(str(folder), VOCAB, 16, 0, torch.float32,
                             **lora.base_load_options(tiny_qlora(folder).lora, None, torch.device("cpu")))
    lora.same_4bit_passes_everywhere(model)
    return model


def tiny_qlora(folder):
    from train_helpers import tiny_params
    return tiny_params(**lora_run(folder, lora=QLORA))


def test_three_qlora_sessions_with_grad_accum_activation_checkpointing_and_packed_documents_equal_one(tmp_path):
    base_model("llama", tmp_path / "base")
    run = lora_run(tmp_path / "base", lora=QLORA, batch_size=2, grad_accum=2, activation_checkpointing=True,
                   export="both")
    whole, split = make_workspace(tmp_path / "whole", prompts=True), make_workspace(tmp_path / "split", prompts=True)
    session(whole, **run)
    assert [session(split, steps_today=2, **run).start_step for _ in range(3)] == [0, 2, 4]
    last = "checkpoints/step-00000006"
    state = json.loads((whole / last / "state.json").read_text())
    assert state["fingerprint_values"]["packing"] == "documents"
    assert state["fingerprint_values"]["lora.quantize"] == "nf4"
    for name in SAME_RUN_FILES:
        assert (split / last / name).read_bytes() == (whole / last / name).read_bytes(), name
    assert tree_bytes(split / "models" / "tiny") == tree_bytes(whole / "models" / "tiny")
    # The checkpoint holds the fp32 adapters and nothing of the 4-bit base.
    assert state["model_tensors"] == "adapters" and not (whole / last / "model.safetensors").exists()
    from safetensors.torch import load_file
    adapters = load_file(whole / last / "adapters.safetensors")
    assert all(".lora_" in name and t.dtype == torch.float32 for name, t in adapters.items())


def test_the_merged_export_is_the_unquantized_base_plus_the_adapters_and_the_adapter_loads_on_it(tmp_path):
    base = base_model("llama", tmp_path / "base").eval()
    root = make_workspace(tmp_path / "w")
    session(root, **lora_run(tmp_path / "base", lora=QLORA, export="both"))
    export = root / "models" / "tiny"
    merged = AutoModelForCausalLM.from_pretrained(export)
    assert {t.dtype for t in merged.state_dict().values()} == {torch.float32}  # as the base's files hold it
    tokens = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

    # The same adapters on the base in 32 bits: the merged model up to the rounding of the merge.
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), export / "adapter")
    torch.testing.assert_close(logits(merged, tokens), logits(on_base, tokens), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(merged, tokens), logits(base, tokens), atol=1e-3)  # the adapters trained

    # On the 4-bit base the session trained, the adapters give the merged logits up to the 4-bit rounding of the
    # base: measured here as how far the 4-bit base's own logits are from the 32-bit base's. Small adapters
    # hardly change that error, so 1.5 times it bounds the difference; it is far from zero, so the merged model
    # is not made of 4-bit weights.
    four_bit = four_bit_base(tmp_path / "base")
    assert {type(m).__name__ for m in four_bit.modules()} >= {"Linear4bit"}
    quantization_error = (logits(four_bit, tokens) - logits(base, tokens)).abs().max().item()
    assert quantization_error > 1e-3
    trained = PeftModel.from_pretrained(four_bit, export / "adapter")
    assert (logits(trained, tokens) - logits(merged, tokens)).abs().max().item() <= 1.5 * quantization_error

    # What the evaluate and generate stages load: the merged model, and an adapter export on its (unquantized) base.
    model, _ = load_model(export)
    torch.testing.assert_close(logits(model, tokens), logits(merged, tokens))
    # Once the budget is spent, another train.export is rebuilt from the checkpoint's adapters.
    assert session(root, **lora_run(tmp_path / "base", lora=QLORA, export="adapter")).stopped_by == "nothing-to-do"
    model, _ = load_model(export)
    torch.testing.assert_close(logits(model, tokens), logits(on_base, tokens))


def test_switching_to_a_4_bit_base_is_a_new_run_and_the_settings_are_checked(tmp_path, capsys):
    base_model("llama", tmp_path / "base")
    root = make_workspace(tmp_path / "w")
    session(root, **lora_run(tmp_path / "base", total_step_budget=4, steps_today=2))
    with pytest.raises(UserError, match=r"train\.resume = require, but .* belongs to a different run; changed: "
                                        r"lora\.quantize: 'none' -> 'nf4'"):
        session(root, **lora_run(tmp_path / "base", lora=QLORA, total_step_budget=4, resume="require"))
    capsys.readouterr()
    assert session(root, **lora_run(tmp_path / "base", lora=QLORA, total_step_budget=4)).start_step == 0
    assert "starting a new run" in capsys.readouterr().out

    def params(**train):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train}))
        return load_params(tmp_path / "params.yaml")

    with pytest.raises(ParamError, match=r"train\.lora\.quantize = 'nf4' applies to LoRA adapters, but "
                                         r"train\.lora\.r is 0"):
        params(init_from="base", lora={"quantize": "nf4"})
    with pytest.raises(ParamError, match=r"train\.strategy = fsdp cannot shard"):
        params(init_from="base", strategy="fsdp", lora={"r": 4, "quantize": "nf4"})
