"""Checkpoints: everything restored, complete or absent, only the latest kept, mirrored for recovery."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.lib import checkpoint as ckpt
from stages.lib.checkpoint import find_checkpoints
from stages.lib.model import tied_names
from stages.lib.parallel import ParallelModel
from stages.lib.world import World


def model_and_optimizer(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def draws():
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def trainee(model, optimizer, live_dir=None):
    """A one-process trainee of any torch module."""
    parallel = ParallelModel(model, model, model, "single", tied_names(model))
    return ckpt.Trainee(parallel, optimizer, World(), live_dir or Path("no-logs"))


def save_checkpoint(checkpoint_dir, recovery_dir, model, optimizer, state):
    ckpt.save(checkpoint_dir, recovery_dir, trainee(model, optimizer), state)
    return checkpoint_dir / ckpt.folder_name(state["step"])


def save(tmp_path, model, optimizer, step):
    return save_checkpoint(tmp_path / "checkpoints", tmp_path / "recovery", model, optimizer,
                           {"step": step, "fingerprint": "abc", "fingerprint_values": {}})


def test_load_restores_weights_optimizer_state_and_every_random_generator(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    save(tmp_path, model, optimizer, step=7)
    expected_draws = draws()
    fresh_model, fresh_optimizer = model_and_optimizer(seed=1)
    draws(), draws()  # move the generators on
    [found] = find_checkpoints([tmp_path / "checkpoints"])
    ckpt.restore(found, trainee(fresh_model, fresh_optimizer))
    assert draws() == expected_draws
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for key, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(value, loaded["state"][key][name]), name


def test_only_the_latest_checkpoint_stays_and_the_recovery_copy_shares_its_files(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    for step in (2, 4, 6):
        save(tmp_path, model, optimizer, step)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000006"]
    assert [p.name for p in (tmp_path / "recovery").iterdir()] == ["step-00000006"]
    for f in (tmp_path / "checkpoints" / "step-00000006").iterdir():
        assert f.stat().st_ino == (tmp_path / "recovery" / "step-00000006" / f.name).stat().st_ino
    state = json.loads((tmp_path / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["format_version"] == ckpt.FORMAT_VERSION and state["step"] == 6


def test_a_crash_before_the_rename_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer(seed=0)
    save(tmp_path, model, optimizer, step=2)

    def crash(tmp):
        raise KeyboardInterrupt("killed while saving")
    monkeypatch.setattr(ckpt, "_before_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, model, optimizer, step=4)
    assert [c.step for c in find_checkpoints([tmp_path / "checkpoints", tmp_path / "recovery"])] == [2]
    assert (tmp_path / "checkpoints" / ".tmp-step-00000004" / "state.json").exists()  # written, never published
    monkeypatch.undo()
    save(tmp_path, model, optimizer, step=6)  # the next save clears the leftover
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000006"]


def test_find_takes_the_newest_complete_checkpoint_from_either_place(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    save(tmp_path, model, optimizer, step=2)
    (tmp_path / "recovery" / "step-00000009").mkdir()  # incomplete: no state.json
    older = tmp_path / "elsewhere"
    save_checkpoint(older, tmp_path / "recovery2", model, optimizer,
                    {"step": 1, "fingerprint": "abc", "fingerprint_values": {}})
    found = find_checkpoints([tmp_path / "checkpoints", tmp_path / "recovery", older])
    assert [(c.step, c.path.parent.name) for c in found] == [(2, "checkpoints"), (1, "elsewhere")]


def test_the_same_step_of_another_run_does_not_hide_this_runs_copy(tmp_path):
    # `dvc exp run` may restore step 2 of the committed run while the recovery folder holds step 2 of a new run.
    model, optimizer = model_and_optimizer(seed=0)
    save_checkpoint(tmp_path / "checkpoints", tmp_path / "other-recovery", model, optimizer,
                    {"step": 2, "fingerprint": "committed-run", "fingerprint_values": {}})
    save_checkpoint(tmp_path / "elsewhere", tmp_path / "recovery", model, optimizer,
                    {"step": 2, "fingerprint": "new-run", "fingerprint_values": {}})
    found = find_checkpoints([tmp_path / "checkpoints", tmp_path / "recovery"])
    assert [(c.step, c.state["fingerprint"], c.path.parent.name) for c in found] == [
        (2, "committed-run", "checkpoints"), (2, "new-run", "recovery")]


def test_saving_over_another_runs_checkpoint_of_the_same_step_replaces_it_in_both_places(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    save_checkpoint(tmp_path / "checkpoints", tmp_path / "recovery", model, optimizer,
                    {"step": 2, "fingerprint": "committed-run", "fingerprint_values": {}})
    save_checkpoint(tmp_path / "checkpoints", tmp_path / "recovery", model, optimizer,
                    {"step": 2, "fingerprint": "new-run", "fingerprint_values": {}})
    for folder in ("checkpoints", "recovery"):
        [found] = find_checkpoints([tmp_path / folder])
        assert found.state["fingerprint"] == "new-run", folder
