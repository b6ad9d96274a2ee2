"""LoRA adapters (train.lora) on tiny random Llama, Qwen2 and Phi models built from their config classes: only the
adapters train, three sessions equal one bitwise (with grad_accum, activation checkpointing and packed documents
too), the checkpoint holds the adapters alone, the merged export and the adapter on its base agree, and the settings
are checked."""

import json
import re
import shutil

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from test_families import SMALL, base_model
from train_helpers import VOCAB, make_workspace, read_tsv, run_stage, session, tiny_params, tree_bytes
from transformers import AutoModelForCausalLM, LlamaConfig

from stages.lib.base.errors import UserError
from stages.lib.base.params import ParamError, load_params
from stages.lib.modeling import lora
from stages.lib.modeling.families import pretrained_model
from stages.lib.modeling.inference import load_model
from stages.lib.training.decision import changed_settings, fingerprint_values

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1}
PROJECTIONS = {"llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
               "phi": {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}}
PROJECTIONS["qwen2"] = PROJECTIONS["llama"]
SAME_RUN_FILES = ("adapters.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json")


def lora_run(base, **overrides) -> dict:
    """train.* settings of a 6-step LoRA run on the model folder `base`."""
    return {"init_from": str(base), "lora": LORA, "total_step_budget": 6, "save_every": 2, "eval_every": 2,
            "export": "both", **overrides}


def adapted_layer(name: str) -> str:
    """`q_proj` for `model.layers.0.self_attn.q_proj.lora_A.default.weight` or `...q_proj.weight`."""
    return name.split(".lora_")[0].rsplit(".", 2)[-1 if ".lora_" in name else -2]


def logits(model, tokens):
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


@pytest.mark.parametrize("family", sorted(PROJECTIONS))
def test_lora_trains_its_adapters_alone_resumes_bitwise_over_three_sessions_and_both_exports_agree(family, tmp_path):
    base = base_model(family, tmp_path / "base")
    run = lora_run(tmp_path / "base")
    whole, split = make_workspace(tmp_path / "whole"), make_workspace(tmp_path / "split")
    session(whole, **run)
    assert [session(split, steps_today=2, **run).start_step for _ in range(3)] == [0, 2, 4]
    last = "checkpoints/step-00000006"
    for name in SAME_RUN_FILES:
        assert (split / last / name).read_bytes() == (whole / last / name).read_bytes(), name
    assert read_tsv(split, "train/loss") == read_tsv(whole, "train/loss")
    assert tree_bytes(split / "models" / "tiny") == tree_bytes(whole / "models" / "tiny")

    # The checkpoint holds the adapters, not the base.
    assert json.loads((whole / last / "state.json").read_text())["model_tensors"] == "adapters"
    assert not (whole / last / "model.safetensors").exists()
    adapters = load_file(whole / last / "adapters.safetensors")
    assert {adapted_layer(name) for name in adapters} == PROJECTIONS[family]
    assert all(".lora_A.default." in name or ".lora_B.default." in name for name in adapters)

    # Only the adapters trained: the merged model differs from the base in the adapted layers' weights alone.
    export = whole / "models" / "tiny"
    merged = AutoModelForCausalLM.from_pretrained(export)
    before, after = base.state_dict(), merged.state_dict()
    assert after.keys() == before.keys()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.endswith(".weight") and adapted_layer(name) in
                       PROJECTIONS[family]}

    # The adapter in PEFT's layout, on the base, gives the merged model's logits (and not the base's).
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["r"], config["lora_alpha"]) == (run["init_from"], 4, 8.0)
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), export / "adapter")
    tokens = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(on_base, tokens), logits(merged, tokens), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(base, tokens), logits(merged, tokens), atol=1e-3)


def test_with_grad_accum_activation_checkpointing_and_packed_documents_three_sessions_equal_one_bitwise(tmp_path):
    base_model("llama", tmp_path / "base")
    run = lora_run(tmp_path / "base", batch_size=2, grad_accum=2, activation_checkpointing=True, export="merged")
    # Instruction data: train.packing auto packs whole documents.
    whole, split = make_workspace(tmp_path / "whole", prompts=True), make_workspace(tmp_path / "split", prompts=True)
    session(whole, **run)
    # Activation checkpointing only shapes a session: switched off for the middle one, the run is the same.
    for checkpointing in (True, False, True):
        session(split, steps_today=2, **{**run, "activation_checkpointing": checkpointing})
    last = "checkpoints/step-00000006"
    assert json.loads((whole / last / "state.json").read_text())["fingerprint_values"]["packing"] == "documents"
    for name in SAME_RUN_FILES:
        assert (split / last / name).read_bytes() == (whole / last / name).read_bytes(), name
    assert tree_bytes(split / "models" / "tiny") == tree_bytes(whole / "models" / "tiny")


def test_an_adapter_export_loads_for_evaluation_on_its_base_and_is_rebuilt_from_the_checkpoint(tmp_path, capsys):
    base_model("llama", tmp_path / "base")
    run = lora_run(tmp_path / "base", export="adapter", total_step_budget=4)
    root = make_workspace(tmp_path / "w")
    session(root, **run)
    export = root / "models" / "tiny"
    out = capsys.readouterr().out
    assert re.search(r"exported the model at step 4 to \S+ \([\d.]+ MB, the adapter\)", out), out
    assert re.search(r"checkpoint +\S*step-0*4 \([\d.]+ MB\)", out), out
    assert sorted(p.name for p in export.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "tokenizer.json", "tokenizer_config.json"]
    model, tokenizer = load_model(export)  # what the evaluate and generate stages load: the base with the adapter
    on_base = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), export)
    tokens = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, tokens), logits(on_base, tokens))
    assert tokenizer.eos_token_id == 0

    exported = tree_bytes(export)
    shutil.rmtree(export)  # as DVC does with a non-persistent output before a run
    assert session(root, **run).stopped_by == "nothing-to-do"
    assert tree_bytes(export) == exported  # rebuilt from the checkpoint's adapters, the same bytes
    # train.export shapes a session, not the run: once the budget is spent, merged rebuilds the export merged.
    assert session(root, **{**run, "export": "merged"}).stopped_by == "nothing-to-do"
    assert not (export / "adapter_config.json").exists()
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(export), tokens), logits(on_base, tokens),
                               rtol=1e-4, atol=1e-5)


def test_a_merged_export_continues_as_the_base_of_a_new_run(tmp_path, capsys):
    base_model("phi", tmp_path / "base")
    root = make_workspace(tmp_path / "w")
    session(root, **lora_run(tmp_path / "base", total_step_budget=2))
    shutil.copytree(root / "models" / "tiny", tmp_path / "stage-1")  # the merged model, its adapter in adapter/
    result = session(root, **lora_run(tmp_path / "stage-1", export="merged", total_step_budget=2))
    assert (result.start_step, result.end_step) == (0, 2)
    assert "the base model in train.init_from (its config or weight files) changed" in capsys.readouterr().out
    # And as a full fine-tune's base: switching LoRA off is a new run too, named by its settings.
    assert session(root, init_from=str(tmp_path / "stage-1"), total_step_budget=2).end_step == 2
    assert "lora.r: 4 -> None" in capsys.readouterr().out
    with pytest.raises(UserError, match=r"holds a LoRA adapter, not a model: point it at a merged model"):
        session(root, **lora_run(tmp_path / "stage-1" / "adapter"))


def test_lora_settings_define_the_run_and_leave_a_full_fine_tunes_fingerprint_as_it_was():
    meta = {"tokenizer_fingerprint": "t", "splits": {"train": {"sha256": "d", "mask_sha256": "m"}}}
    full = fingerprint_values(tiny_params(init_from="base"), meta, 1, "abc")
    assert not any(key.startswith("lora.") for key in full)
    lora = fingerprint_values(tiny_params(init_from="base", lora={"r": 4}), meta, 1, "abc")
    assert {k: v for k, v in lora.items() if k.startswith("lora.")} == {
        "lora.r": 4, "lora.alpha": 16.0, "lora.dropout": 0.05, "lora.target_modules": "auto"}
    for change, expected in (({"r": 8}, "lora.r: 4 -> 8"), ({"alpha": 4.0}, "lora.alpha: 16.0 -> 4.0"),
                             ({"dropout": 0.0}, "lora.dropout: 0.05 -> 0.0"),
                             ({"target_modules": ["q_proj"]}, "lora.target_modules: 'auto' -> ['q_proj']")):
        other = fingerprint_values(tiny_params(init_from="base", lora={"r": 4, **change}), meta, 1, "abc")
        assert changed_settings(lora, other) == [expected]
    export = fingerprint_values(tiny_params(init_from="base", lora={"r": 4}, export="adapter"), meta, 1, "abc")
    assert export == lora  # what is exported shapes a session, not the run


def test_the_settings_are_checked_before_anything_is_loaded_or_written(tmp_path):
    def params(**train):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": train}))
        return load_params(tmp_path / "params.yaml")

    with pytest.raises(ParamError, match=r"train\.lora\.r = 8 trains LoRA adapters on a pretrained model, but "
                                         r"train\.init_from is empty"):
        params(lora={"r": 8})
    with pytest.raises(ParamError, match=r"train\.export = 'adapter' exports a LoRA adapter, but train\.lora\.r "
                                         r"is 0"):
        params(export="adapter")
    with pytest.raises(ParamError, match=r"target_modules = 'q_proj' is not allowed; expected 'auto' or a list"):
        params(init_from="base", lora={"r": 8, "target_modules": "q_proj"})
    with pytest.raises(ParamError, match=r"init_from = 'models/sample-arith' is the folder this run exports to"):
        params(init_from="models/sample-arith")

    base_model("qwen2", tmp_path / "base")
    root = make_workspace(tmp_path / "w")
    wrong = {**LORA, "target_modules": ["q_proj", "qproj"]}
    with pytest.raises(UserError, match=r"'qproj' is no linear layer of this model; its linear layers are q_proj, "
                                        r"k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"):
        session(root, **lora_run(tmp_path / "base", lora=wrong))
    assert not (root / "checkpoints").exists()

    # A tokenizer larger than the base's embeddings would add rows that a LoRA never trains.
    AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, "vocab_size": VOCAB - 8})).save_pretrained(
        tmp_path / "small-vocabulary")
    with pytest.raises(UserError, match=r"the tokenizer \(data/tokenizer\) has 64 tokens but the base model in .* "
                                        r"has embeddings for 56"):
        session(root, **lora_run(tmp_path / "small-vocabulary"))


def test_explicit_targets_adapt_those_layers_alone(tmp_path):
    base_model("llama", tmp_path / "base")
    root = make_workspace(tmp_path / "w")
    session(root, **lora_run(tmp_path / "base", lora={**LORA, "target_modules": ["v_proj", "q_proj"]},
                             total_step_budget=1))
    adapters = load_file(root / "checkpoints" / "step-00000001" / "adapters.safetensors")
    assert {adapted_layer(name) for name in adapters} == {"q_proj", "v_proj"}


def test_two_processes_with_ddp_then_fsdp_train_the_adapters_as_one_process_does(tmp_path):
    base_model("qwen2", tmp_path / "base")  # tied embeddings, frozen; biased q, k, v
    run = lora_run(tmp_path / "base", total_step_budget=4, batch_size=4, lora={**LORA, "dropout": 0.0})
    one = make_workspace(tmp_path / "one")
    session(one, grad_accum=2, **run)  # the same global batch of 8 on one process
    two = make_workspace(tmp_path / "two")
    for strategy in ("ddp", "fsdp"):
        done = run_stage(two, steps_today=2, devices=2, strategy=strategy, **run)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"2 processes ({strategy}, gloo)" in done.stdout
    assert "resuming from step 2" in done.stdout
    last = "checkpoints/step-00000004"
    assert json.loads((two / last / "state.json").read_text())["world_size"] == 2
    theirs, ours = (load_file(root / last / "adapters.safetensors") for root in (one, two))
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-4, atol=1e-5, msg=name)
    tokens = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    exports = [AutoModelForCausalLM.from_pretrained(root / "models" / "tiny") for root in (one, two)]
    torch.testing.assert_close(logits(exports[1], tokens), logits(exports[0], tokens), rtol=1e-4, atol=1e-5)


def test_two_processes_with_dropout_resume_bitwise_each_from_its_own_random_state(tmp_path):
    base_model("llama", tmp_path / "base")
    run = lora_run(tmp_path / "base", total_step_budget=4, batch_size=4, devices=2, lora={**LORA, "dropout": 0.05})
    whole = make_workspace(tmp_path / "whole")
    assert run_stage(whole, **run).returncode == 0
    split = make_workspace(tmp_path / "split")
    for _ in range(2):
        done = run_stage(split, steps_today=2, **run)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step 2" in done.stdout
    last = "checkpoints/step-00000004"
    assert tree_bytes(split / last).keys() >= {"rng.json", "rng-rank1.json"}
    for name in ("adapters.safetensors", "optimizer.safetensors", "rng.json", "rng-rank1.json"):
        assert (split / last / name).read_bytes() == (whole / last / name).read_bytes(), name
    # Each process drew its own masks: rank 1's random state is not rank 0's.
    assert (split / last / "rng.json").read_bytes() != (split / last / "rng-rank1.json").read_bytes()


def test_a_checkpoint_with_rank_0s_random_state_alone_resumes_on_two_processes(tmp_path):
    base_model("llama", tmp_path / "base")
    run = lora_run(tmp_path / "base", total_step_budget=4, batch_size=4, devices=2, lora={**LORA, "dropout": 0.05})
    root = make_workspace(tmp_path / "root")
    assert run_stage(root, steps_today=2, **run).returncode == 0
    (root / "checkpoints" / "step-00000002" / "rng-rank1.json").unlink()  # as saved before each process saved its own
    done = run_stage(root, **run)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step 2" in done.stdout
    assert (root / "checkpoints" / "step-00000004" / "rng-rank1.json").exists()


def test_the_base_is_held_in_the_compute_dtype_and_the_adapters_and_their_optimizer_state_in_fp32(tmp_path):
    base_model("llama", tmp_path / "base")
    run = tiny_params(**lora_run(tmp_path / "base"))
    assert lora.base_dtype(run, torch.bfloat16) == torch.bfloat16 and lora.base_dtype(run, None) == torch.float32
    assert lora.base_dtype(tiny_params(), torch.bfloat16) == torch.float32  # weights that train: fp32 masters
    model = lora.add_adapters(pretrained_model(run.init_from, VOCAB, 16, 0, dtype=torch.bfloat16), run.lora)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in model.parameters() if not p.requires_grad} == {torch.bfloat16}

    root = make_workspace(tmp_path / "w")
    session(root, **lora_run(tmp_path / "base"), precision="bf16", steps_today=2)  # autocast on a bf16 base
    folder = root / "checkpoints" / "step-00000002"
    assert {t.dtype for t in load_file(folder / "adapters.safetensors").values()} == {torch.float32}
    assert {t.dtype for t in load_file(folder / "optimizer.safetensors").values()} == {torch.float32}
