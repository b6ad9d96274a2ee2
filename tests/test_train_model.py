"""The chunked masked loss against HuggingFace's own, and the export that from_pretrained loads."""

import pytest
import torch
from conftest import save_tokenizer
from torch.utils.flop_counter import FlopCounterMode
from train_helpers import VOCAB, make_tokenizer, tree_bytes
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.lib.base.errors import UserError
from stages.lib.base.params import ModelParams
from stages.lib.modeling.export import export_model
from stages.lib.modeling.families import new_model, pretrained_model, set_special_ids
from stages.lib.modeling.loss import head_loss_sum, make_loss_fn
from stages.lib.tokenizing.batches import IGNORE_INDEX

SPECIAL = {"bos_token_id": None, "eos_token_id": 0, "pad_token_id": 1}


def tiny_model(seed=0, tie=True):
    size = ModelParams(n_layer=2, hidden_size=32, n_head=4, max_position_embeddings=32, tie_embeddings=tie)
    return new_model(size, VOCAB, SPECIAL, seed)


def windows(seed=1, rows=4, seq_len=16):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (rows, seq_len + 1), generator=g)
    labels = tokens[:, 1:].clone()
    labels[torch.rand(labels.shape, generator=g) < 0.3] = IGNORE_INDEX
    return tokens, labels


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_and_gradients_equal_huggingface_loss_with_minus_100_labels(tie):
    model = tiny_model(tie=tie)
    tokens, labels = windows()
    counted = int((labels != IGNORE_INDEX).sum())
    ours = make_loss_fn(model)(tokens[:, :-1], labels) / counted
    ours.backward()
    our_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    # HuggingFace shifts labels itself: feed the whole window and labels aligned with its inputs.
    hf_labels = torch.cat([torch.full((len(labels), 1), IGNORE_INDEX), labels], dim=1)
    theirs = model(input_ids=tokens, labels=hf_labels).loss
    theirs.backward()
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(our_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunk_size_does_not_change_the_result_and_masked_rows_do_not_count():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (50,), generator=g)
    labels[::5] = IGNORE_INDEX
    results = []
    for chunk_rows in (1, 7, 64):
        loss = head_loss_sum(hidden, weight, labels, chunk_rows=chunk_rows)
        hidden.grad = weight.grad = None
        (loss * 0.5).backward()
        results.append((loss.item(), hidden.grad.clone(), weight.grad.clone()))
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    assert results[0][0] == pytest.approx(plain.item(), rel=1e-5)
    for loss, grad_hidden, grad_weight in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        torch.testing.assert_close(grad_hidden, results[0][1])
        torch.testing.assert_close(grad_weight, results[0][2])
    assert results[0][1][::5].abs().max() == 0  # rows whose label is -100 get no gradient


def test_a_biased_head_chunked_equals_the_plain_cross_entropy_with_every_gradient():
    g = torch.Generator().manual_seed(0)
    hidden, weight, bias = (torch.randn(*shape, generator=g, requires_grad=True) for shape in ((50, 8), (30, 8), (30,)))
    labels = torch.randint(0, 30, (50,), generator=g)
    labels[::4] = IGNORE_INDEX
    plain = torch.nn.functional.cross_entropy(hidden @ weight.t() + bias, labels, ignore_index=IGNORE_INDEX,
                                              reduction="sum")
    expected = [plain.item(), *torch.autograd.grad(plain * 0.5, (hidden, weight, bias))]
    for chunk_rows in (1, 7, 64):
        loss = head_loss_sum(hidden, weight, labels, chunk_rows=chunk_rows, bias=bias)
        grads = torch.autograd.grad(loss * 0.5, (hidden, weight, bias))
        assert loss.item() == pytest.approx(expected[0], rel=1e-5)
        for got, want in zip(grads, expected[1:]):
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tie", [True, False])
def test_a_batch_with_no_counted_target_gives_every_parameter_a_zero_gradient(tie):
    model = tiny_model(tie=tie)
    tokens, labels = windows()
    loss = make_loss_fn(model)(tokens[:, :-1], torch.full_like(labels, IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().max() == 0, name  # in the graph: DDP gets every gradient


def test_a_frozen_head_gets_no_gradient_computed_and_the_hidden_states_the_same_one():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(24, 16, generator=g), torch.randn(64, 16, generator=g)
    labels = torch.randint(0, 64, (24,), generator=g)
    grads, flops = {}, {}
    for head_trains in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_(head_trains)
        with FlopCounterMode(display=False) as counter:
            head_loss_sum(h, w, labels, chunk_rows=24).backward()
        grads[head_trains], flops[head_trains] = h.grad, counter.get_total_flops()
        assert (w.grad is not None) == head_trains
    torch.testing.assert_close(grads[False], grads[True], rtol=0, atol=0)
    assert flops[False] == flops[True] * 2 // 3  # logits and the hidden states' gradient; no weight gradient


def test_export_loads_with_from_pretrained_and_is_byte_reproducible(tmp_path):
    make_tokenizer(tmp_path / "tokenizer")
    model = tiny_model(seed=3)
    set_special_ids(model, SPECIAL)
    export_model(model, tmp_path / "tokenizer", tmp_path / "models" / "tiny")
    first = tree_bytes(tmp_path / "models" / "tiny")
    export_model(tiny_model(seed=3), tmp_path / "tokenizer", tmp_path / "models" / "tiny")  # overwrite in place
    assert tree_bytes(tmp_path / "models" / "tiny") == first
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(first)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny"]  # no temporary folder left

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "tiny")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "models" / "tiny")
    assert loaded.generation_config.eos_token_id == tokenizer.eos_token_id == 0
    assert loaded.config.use_cache and loaded.generation_config.use_cache  # users generate with the KV cache
    assert model.generation_config.eos_token_id == 0  # the training model is left as it was
    assert model.config.use_cache is False  # while training goes on without it
    tokens, _ = windows()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_fine_tuning_grows_a_smaller_vocabulary_and_rejects_a_too_long_context(tmp_path):
    size = ModelParams(n_layer=1, hidden_size=16, n_head=2, max_position_embeddings=16)
    new_model(size, VOCAB - 16, SPECIAL, seed=0).save_pretrained(tmp_path / "base")
    model = pretrained_model(str(tmp_path / "base"), VOCAB, seq_len=16, seed=0)
    assert model.get_input_embeddings().num_embeddings == VOCAB
    assert model.get_output_embeddings().weight.shape[0] == VOCAB
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # master weights
    frozen_base = pretrained_model(str(tmp_path / "base"), VOCAB, seq_len=16, seed=0, dtype=torch.bfloat16)
    assert {p.dtype for p in frozen_base.parameters()} == {torch.bfloat16}
    with pytest.raises(UserError, match=r"train\.seq_len = 32 is above the 16 positions"):
        pretrained_model(str(tmp_path / "base"), VOCAB, seq_len=32, seed=0)
    with pytest.raises(UserError, match=r"train\.init_from = .*no config\.json"):
        pretrained_model(str(tmp_path / "nowhere"), VOCAB, seq_len=16, seed=0)


def test_a_chat_models_export_stops_generating_at_the_end_of_a_turn(tmp_path):
    save_tokenizer(tmp_path / "tokenizer", specials=("<eos>", "<pad>", "<|im_end|>"), eos="<eos>", pad="<pad>",
                   vocab_size=VOCAB)
    model = tiny_model()
    set_special_ids(model, SPECIAL)
    export_model(model, tmp_path / "tokenizer", tmp_path / "chat")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "chat").generation_config.eos_token_id == [0, 2]
