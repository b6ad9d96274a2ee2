"""A base model (train.init_from) is checked from its safetensors headers before it is loaded: a missing or unexpected
tensor, a missing shard or a file cut short is refused by name, where transformers would fill in random values."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from stages.lib.base.errors import UserError
from stages.lib.modeling.families import pretrained_model

SMALL = {"vocab_size": 256, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def saved(config, folder, **save_options):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, **save_options)
    return folder


def rewrite(file, change):
    """Rewrite a safetensors file with `change` applied to its tensors (a dict, changed in place)."""
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def load(folder):
    return pretrained_model(str(folder), vocab_size=0, seq_len=16, seed=0)


def test_a_whole_base_loads_and_a_deleted_tensor_is_refused_by_name(tmp_path):
    base = saved(LlamaConfig(**SMALL, tie_word_embeddings=False), tmp_path / "base")
    assert load(base).model.norm.weight.shape == (32,)
    rewrite(base / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(UserError, match=r"'.*base'.*missing 1: model\.norm\.weight\)"):
        load(base)


def test_an_unexpected_tensor_is_refused_by_name(tmp_path):
    base = saved(LlamaConfig(**SMALL, tie_word_embeddings=False), tmp_path / "base")
    rewrite(base / "model.safetensors", lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(2)}))
    with pytest.raises(UserError, match=r"unexpected 1: model\.layers\.7\.mlp\.up_proj\.weight"):
        load(base)


def test_a_tied_head_is_not_missing(tmp_path):
    base = saved(Qwen2Config(**SMALL, tie_word_embeddings=True), tmp_path / "base")
    assert "lm_head.weight" not in load_file(base / "model.safetensors")  # one tensor, saved once
    model = load(base)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_missing_shard_is_refused_by_name(tmp_path):
    base = saved(LlamaConfig(**SMALL, tie_word_embeddings=False), tmp_path / "base", max_shard_size="20KB")
    shards = sorted(base.glob("model-*.safetensors"))
    assert len(shards) > 2
    load(base)
    shards[1].unlink()
    with pytest.raises(UserError, match=rf"names {len(shards)} weight files and 1 of them are missing: "
                                        rf"{shards[1].name}"):
        load(base)


def test_a_file_cut_short_is_refused(tmp_path):
    base = saved(LlamaConfig(**SMALL, tie_word_embeddings=False), tmp_path / "base")
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"model\.safetensors is cut short"):
        load(base)
