"""train.activation_checkpointing: each block recomputed in the backward pass gives the same losses and gradients
while far less is kept for the backward pass, and a run split into sessions still ends bitwise where one would."""

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_workspace, read_tsv, session

from stages.lib.base.params import ModelParams
from stages.lib.modeling.families import checkpoint_activations, new_model
from stages.lib.modeling.loss import LossModule


def saved_for_backward(module, tokens, labels) -> tuple[torch.Tensor, int]:
    """The loss, and the bytes autograd keeps for the backward pass outside any recomputed region."""
    kept = {}

    def pack(tensor):
        kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module(tokens, labels)
    return loss, sum(kept.values())


def loss_and_gradients(checkpointed: bool):
    model = new_model(ModelParams(n_layer=3, hidden_size=64, n_head=4, max_position_embeddings=64), 96,
                      {"eos_token_id": 0}, seed=0)
    if checkpointed:
        checkpoint_activations(model)
    model.train()
    g = torch.Generator().manual_seed(1)
    tokens, labels = torch.randint(0, 96, (4, 64), generator=g), torch.randint(0, 96, (4, 64), generator=g)
    loss, kept = saved_for_backward(LossModule(model), tokens, labels)
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}, kept


def test_recomputed_blocks_give_the_same_loss_and_gradients_and_keep_far_less_for_the_backward_pass():
    loss, grads, kept = loss_and_gradients(checkpointed=False)
    loss_ckpt, grads_ckpt, kept_ckpt = loss_and_gradients(checkpointed=True)
    assert loss_ckpt == pytest.approx(loss, rel=1e-6)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert kept_ckpt < kept / 4  # only the blocks' inputs (and what lies outside the blocks) stay


def test_a_checkpointed_run_resumes_bitwise_and_trains_as_an_unchecked_one(tmp_path):
    whole, split, plain = (make_workspace(tmp_path / name) for name in ("whole", "split", "plain"))
    session(whole, activation_checkpointing=True)
    for _ in range(3):
        session(split, activation_checkpointing=True, steps_today=4)
    session(plain)
    last = "checkpoints/step-00000012/model.safetensors"
    assert (split / last).read_bytes() == (whole / last).read_bytes()
    assert read_tsv(split, "train/loss") == read_tsv(whole, "train/loss")
    a, b = load_file(whole / last), load_file(plain / last)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    losses = [[float(v) for _, v in read_tsv(root, "train/loss")] for root in (whole, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
