"""train.lora.train_embeddings: LoRA adapters plus the input embeddings and the output head (PEFT's
modules_to_save), at their own rate, on a tiny Llama whose tokenizer has more tokens than the base: the embeddings
grow, three sessions equal one bitwise, and both exports load with the grown vocabulary."""

import json

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file
from test_families import SMALL
from test_lora import LORA, SAME_RUN_FILES, lora_run
from train_helpers import VOCAB, make_workspace, session, tree_bytes
from transformers import AutoModelForCausalLM, LlamaConfig

from stages.lib.base.params import ParamError, load_params
from stages.lib.modeling.inference import load_model

EMBEDDINGS = {**LORA, "train_embeddings": True}


def logits(model, tokens):
    with torch.no_grad():
        return model.eval()(input_ids=tokens).logits


def test_new_tokens_grow_the_trained_embeddings_resume_bitwise_and_both_exports_load(tmp_path):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, "vocab_size": VOCAB - 8}))
    base.save_pretrained(tmp_path / "base")
    run = lora_run(tmp_path / "base", lora=EMBEDDINGS, embedding_lr=2e-3)
    whole, split = make_workspace(tmp_path / "whole"), make_workspace(tmp_path / "split")
    session(whole, **run)
    assert [session(split, steps_today=2, **run).start_step for _ in range(3)] == [0, 2, 4]
    last = "checkpoints/step-00000006"
    for name in SAME_RUN_FILES:
        assert (split / last / name).read_bytes() == (whole / last / name).read_bytes(), name
    assert tree_bytes(split / "models" / "tiny") == tree_bytes(whole / "models" / "tiny")

    # The checkpoint holds the grown, trained embeddings and head beside the adapters, in a group of their own at
    # train.embedding_lr (2e-3 against lr 1e-2: a fifth of the scheduled rate, 1e-3 at the end).
    adapters = load_file(whole / last / "adapters.safetensors")
    assert adapters["model.embed_tokens.modules_to_save.default.weight"].shape == (VOCAB, 32)
    assert adapters["lm_head.modules_to_save.default.weight"].shape == (VOCAB, 32)
    groups = json.loads((whole / last / "optimizer.json").read_text())["param_groups"]
    assert [g.get("lr_scale") for g in groups] == [None, None, 0.2]
    assert groups[2]["lr"] == groups[0]["lr"] * 0.2 and len(groups[2]["params"]) == 2

    # The merged export: a plain model of the grown vocabulary whose embeddings and head trained.
    export = whole / "models" / "tiny"
    merged = AutoModelForCausalLM.from_pretrained(export)
    assert merged.get_input_embeddings().num_embeddings == VOCAB
    known = base.get_input_embeddings().weight
    assert not torch.equal(merged.get_input_embeddings().weight[:VOCAB - 8], known)
    # The adapter on its base grown to the tokenizer's vocabulary gives the merged model's logits.
    grown = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    grown.resize_token_embeddings(VOCAB)
    config = json.loads((export / "adapter" / "adapter_config.json").read_text())
    assert sorted(config["modules_to_save"]) == ["embed_tokens", "lm_head"]
    on_base = PeftModel.from_pretrained(grown, export / "adapter")
    tokens = torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    tokens[:, -1] = VOCAB - 1  # a new token
    torch.testing.assert_close(logits(on_base, tokens), logits(merged, tokens), rtol=1e-4, atol=1e-5)

    # What evaluate and generate load, an adapter export included: the base is grown to the adapter's vocabulary.
    assert session(whole, **{**run, "export": "adapter"}).stopped_by == "nothing-to-do"
    model, _ = load_model(export)
    torch.testing.assert_close(logits(model, tokens), logits(merged, tokens), rtol=1e-4, atol=1e-5)


def test_trained_embeddings_need_lora_adapters(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": {"init_from": "base",
                                                                    "lora": {"train_embeddings": True}}}))
    with pytest.raises(ParamError, match=r"train\.lora\.train_embeddings = True applies to LoRA adapters, but "
                                         r"train\.lora\.r is 0 \(a full fine-tune\)"):
        load_params(tmp_path / "params.yaml")
