"""train.optimizer: adamw8bit (bitsandbytes' 8-bit AdamW, its CPU backend) on a tiny new model: its state is saved
as tensors in safetensors (8-bit moments included), three sessions equal one bitwise, and it is part of the run."""

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_workspace, read_tsv, session, tiny_params, tree_bytes

from stages.lib.base.errors import UserError
from stages.lib.training.decision import changed_settings, fingerprint_values
from stages.lib.training.optimizers import make_optimizer

EIGHT_BIT = {"optimizer": "adamw8bit", "total_step_budget": 6, "save_every": 2, "eval_every": 2}


def test_three_sessions_with_8_bit_adamw_equal_one_bitwise_and_its_state_is_safetensors(tmp_path):
    whole, split = make_workspace(tmp_path / "whole"), make_workspace(tmp_path / "split")
    session(whole, **EIGHT_BIT)
    assert [session(split, steps_today=2, **EIGHT_BIT).start_step for _ in range(3)] == [0, 2, 4]
    last = "checkpoints/step-00000006"
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json"):
        assert (split / last / name).read_bytes() == (whole / last / name).read_bytes(), name
    assert read_tsv(split, "train/loss") == read_tsv(whole, "train/loss")
    assert tree_bytes(split / "models" / "tiny") == tree_bytes(whole / "models" / "tiny")

    # The MLP matrices (32 x 128, 4,096 values) get 8-bit moments; smaller tensors fp32 ones. Nothing is a pickle.
    state = load_file(whole / last / "optimizer.safetensors")
    eight_bit = {name for name, t in state.items() if t.dtype == torch.uint8}
    assert eight_bit and all(".state1" in name or ".state2" in name for name in eight_bit)
    assert not list((whole / last).glob("*.pt"))
    assert json.loads((whole / last / "state.json").read_text())["fingerprint_values"]["optimizer"] == "adamw8bit"


def test_the_8_bit_optimizer_defines_the_run_and_keeps_adamws_groups(tmp_path):
    meta = {"tokenizer_fingerprint": "t", "splits": {"train": {"sha256": "d", "mask_sha256": "m"}}}
    adamw = fingerprint_values(tiny_params(), meta, 1, None)
    assert "optimizer" not in adamw  # runs begun before train.optimizer existed keep their fingerprint
    eight = fingerprint_values(tiny_params(optimizer="adamw8bit"), meta, 1, None)
    assert changed_settings(adamw, eight) == ["optimizer: 'adamw' -> 'adamw8bit'"]

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64))
    plain, eight_bit = (make_optimizer(model, tiny_params(optimizer=name)) for name in ("adamw", "adamw8bit"))
    assert type(eight_bit).__name__ == "AdamW8bit"
    for theirs, ours in zip(plain.param_groups, eight_bit.param_groups):
        assert [p is q for p, q in zip(theirs["params"], ours["params"])] == [True] * len(theirs["params"])
        assert (theirs["weight_decay"], theirs["betas"]) == (ours["weight_decay"], ours["betas"])

    root = make_workspace(tmp_path / "w")
    session(root, **{**EIGHT_BIT, "steps_today": 2})
    with pytest.raises(UserError, match=r"changed: optimizer: 'adamw8bit' -> 'adamw'"):
        session(root, **{**EIGHT_BIT, "optimizer": "adamw", "resume": "require"})
