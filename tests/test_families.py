"""train.init_from for the families people fine-tune, each a tiny random model built from its own config class: the
chunked loss equals the family's own, a run trains and resumes bitwise, and the export loads with
AutoModelForCausalLM and generates."""

import pytest
import torch
from train_helpers import EOS_ID, PAD_ID, VOCAB, make_workspace, read_tsv, session
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, PhiConfig, Qwen2Config

from stages.lib.modeling.families import has_plain_head
from stages.lib.modeling.loss import make_loss_fn
from stages.lib.tokenizing.batches import IGNORE_INDEX

SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 64, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
         "bos_token_id": None}
FAMILIES = {
    "llama": lambda: LlamaConfig(**SMALL, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**SMALL, num_key_value_heads=2, sliding_window=8),  # shorter than seq_len
    "qwen2": lambda: Qwen2Config(**SMALL, num_key_value_heads=2, tie_word_embeddings=True),  # biased q, k, v
    # phi-2's architecture: a biased LM head, partial rotary, parallel attention and MLP, dropout in training.
    # 10 dimensions per head, 4 of them rotated, as phi-2 rotates 32 of its 80.
    "phi": lambda: PhiConfig(**{**SMALL, "hidden_size": 40}, partial_rotary_factor=0.4, resid_pdrop=0.1),
    "gpt2": lambda: GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=None),  # dropout 0.1
}


def base_model(family: str, folder):
    """A tiny random model of the family, saved as a HuggingFace folder (what train.init_from points at)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family](), attn_implementation="sdpa")
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_chunked_loss_and_its_gradients_equal_the_familys_own(family, tmp_path):
    model = base_model(family, tmp_path / "base").eval()  # no dropout: both sides must see the same network
    assert has_plain_head(model)
    assert (model.get_output_embeddings().bias is not None) == (family == "phi")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, 17), generator=g)
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.3] = IGNORE_INDEX
    ours = make_loss_fn(model)(tokens[:, :-1], labels) / (labels != IGNORE_INDEX).sum()
    ours.backward()
    our_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    theirs = model(input_ids=tokens, labels=torch.cat([torch.full((3, 1), IGNORE_INDEX), labels], dim=1)).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_family_fine_tunes_resumes_bitwise_exports_and_generates(family, tmp_path):
    base_model(family, tmp_path / "base")
    tune = {"init_from": str(tmp_path / "base"), "total_step_budget": 6, "save_every": 3, "eval_every": 3}
    whole, split = make_workspace(tmp_path / "whole"), make_workspace(tmp_path / "split")
    session(whole, **tune)
    assert [session(split, steps_today=3, **tune).start_step for _ in range(2)] == [0, 3]
    last = "checkpoints/step-00000006/model.safetensors"
    assert (split / last).read_bytes() == (whole / last).read_bytes()
    assert read_tsv(split, "train/loss") == read_tsv(whole, "train/loss")
    losses = [float(v) for _, v in read_tsv(whole, "train/loss")]
    assert all(torch.isfinite(torch.tensor(losses)))

    exported = AutoModelForCausalLM.from_pretrained(whole / "models" / "tiny")
    assert exported.config.model_type == family
    prompt = torch.tensor([[5, 6, 7]])
    out = exported.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                            min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], prompt)
    assert out[0, 3:].tolist() == exported.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                    max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                                    use_cache=False)[0, 3:].tolist()  # the KV cache agrees
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # the export holds the trained weights
    assert any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(), base.state_dict().values()))
