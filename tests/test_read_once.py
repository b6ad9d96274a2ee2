"""A session reads each of its inputs once and passes it on: the token folder's meta.json, each checkpoint's
state.json (checked with every safetensors header, which is the costly part), a pretrained base's config.json."""

from collections import Counter
from dataclasses import replace
from pathlib import Path

from train_helpers import make_workspace, session, tiny_params

from stages.lib.modeling import memory


def test_a_session_reads_the_token_meta_once_and_each_checkpoint_state_once(tmp_path, monkeypatch):
    root = make_workspace(tmp_path)
    # a first session leaves a checkpoint, which the second one finds, restores and prunes
    session(root, total_step_budget=4, save_every=2, eval_every=2)
    reads = Counter()
    read_text = Path.read_text

    def counted(path, *args, **kwargs):
        if path.name in ("meta.json", "state.json"):
            reads[(path.parent.parent.name, path.parent.name, path.name)] += 1
        return read_text(path, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", counted)
    result = session(root, total_step_budget=8, save_every=2, eval_every=2)
    assert result.end_step == 8
    assert reads[("data", "tokens", "meta.json")] == 1
    # each checkpoint folder: once when it is written (or found when deciding), once when the next save prunes it
    states = {key: n for key, n in reads.items() if key[2] == "state.json"}
    assert states and max(states.values()) <= 2, states


def test_a_fine_tunes_base_config_is_read_once_for_its_checks(tmp_path, monkeypatch):
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    from stages.lib.modeling import families, lora
    folder = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    reads = []
    real = AutoConfig.from_pretrained
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: reads.append(a) or real(*a, **k))
    families._read_config.cache_clear()
    train = tiny_params(init_from=str(folder), lora={"r": 4})
    config = families.model_config(train, 80, {})  # a larger tokenizer grows the plan's copy, not the cached one
    lora.checked_plan_settings(replace(train, lora=replace(train.lora, train_embeddings=True)), 80,
                               memory.model_shape(config))
    families.check_base_tensors(str(folder))
    assert len(reads) == 1 and config.vocab_size == 80 and families.base_config(str(folder)).vocab_size == 64
