"""Checkpoints: everything restored, complete or absent, only the latest kept, mirrored for recovery, nothing
unreadable ever skipped or deleted, no pickle written."""

import json
import pickle
import pickletools
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.lib.checkpointing import parts as ckpt
from stages.lib.checkpointing import store
from stages.lib.checkpointing.parts import Unreadable
from stages.lib.distributed.parallel import ParallelModel
from stages.lib.distributed.world import World
from stages.lib.modeling.families import tied_names


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
    store.save(checkpoint_dir, recovery_dir, trainee(model, optimizer), state)
    return checkpoint_dir / store.folder_name(state["step"])


def save(tmp_path, model, optimizer, step, fingerprint="abc"):
    return save_checkpoint(tmp_path / "checkpoints", tmp_path / "recovery", model, optimizer,
                           {"step": step, "fingerprint": fingerprint, "fingerprint_values": {}})


def found(tmp_path, checkpoint_dir="checkpoints"):
    return store.find(tmp_path / checkpoint_dir, tmp_path / "recovery").checkpoints


def assert_same_optimizer_state(saved, loaded):
    assert saved["param_groups"] == loaded["param_groups"]
    assert saved["state"].keys() == loaded["state"].keys()
    for key, state in saved["state"].items():
        for name, value in state.items():
            assert torch.equal(value, loaded["state"][key][name]), name


def test_load_restores_weights_optimizer_state_and_every_random_generator(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    save(tmp_path, model, optimizer, step=7)
    expected_draws = draws()
    fresh_model, fresh_optimizer = model_and_optimizer(seed=1)
    draws(), draws()  # move the generators on
    [checkpoint] = found(tmp_path)
    ckpt.restore(checkpoint, trainee(fresh_model, fresh_optimizer))
    assert draws() == expected_draws
    for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values()):
        assert torch.equal(a, b)
    assert_same_optimizer_state(optimizer.state_dict(), fresh_optimizer.state_dict())


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
    monkeypatch.setattr(store, "_before_publish", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, model, optimizer, step=4)
    assert [c.step for c in found(tmp_path)] == [2]
    assert (tmp_path / "checkpoints" / ".tmp-step-00000004" / "state.json").exists()  # written, never published
    monkeypatch.undo()
    save(tmp_path, model, optimizer, step=6)  # the next save clears the leftover
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000006"]


def test_find_takes_the_newest_checkpoint_from_either_place_and_one_copy_of_each(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    save(tmp_path, model, optimizer, step=2)
    save_checkpoint(tmp_path / "elsewhere", tmp_path / "recovery", model, optimizer,
                    {"step": 3, "fingerprint": "abc", "fingerprint_values": {}})  # the recovery copy moves on
    assert [(c.step, c.path.parent.name) for c in found(tmp_path)] == [(3, "recovery"), (2, "checkpoints")]
    assert [(c.step, c.path.parent.name) for c in found(tmp_path, "elsewhere")] == [(3, "elsewhere")]


def test_the_same_step_of_another_run_does_not_hide_this_runs_copy(tmp_path):
    # `dvc exp run` may restore step 2 of the committed run while the recovery folder holds step 2 of a new run.
    model, optimizer = model_and_optimizer(seed=0)
    save_checkpoint(tmp_path / "checkpoints", tmp_path / "other-recovery", model, optimizer,
                    {"step": 2, "fingerprint": "committed-run", "fingerprint_values": {}})
    save_checkpoint(tmp_path / "elsewhere", tmp_path / "recovery", model, optimizer,
                    {"step": 2, "fingerprint": "new-run", "fingerprint_values": {}})
    assert [(c.step, c.state["fingerprint"], c.path.parent.name) for c in found(tmp_path)] == [
        (2, "committed-run", "checkpoints"), (2, "new-run", "recovery")]


def test_saving_over_another_runs_checkpoint_of_the_same_step_replaces_it_in_both_places(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    save(tmp_path, model, optimizer, step=2, fingerprint="committed-run")
    save(tmp_path, model, optimizer, step=2, fingerprint="new-run")
    for folder in ("checkpoints", "recovery"):
        [checkpoint] = store.find(tmp_path / folder, tmp_path / "none").checkpoints
        assert checkpoint.state["fingerprint"] == "new-run", folder


def break_state(folder: Path, change) -> None:
    """Rewrite a checkpoint's state.json as a new file (its old one may be hardlinked to the recovery copy)."""
    path = folder / "state.json"
    state = json.loads(path.read_text())
    text = change(state)
    path.unlink()
    path.write_text(text if isinstance(text, str) else json.dumps(state))


DAMAGE = {
    "a newer format": (lambda s: s.update(format_version=99), r"format_version 99.*written by a newer version"),
    "state.json that is not JSON": (lambda s: '{"step": 4, "fing', r"state\.json is damaged"),
    "state.json without step": (lambda s: s.pop("step"), r"state\.json has no 'step'"),
    "no optimizer file": (None, r"its optimizer file optimizer\.safetensors is missing"),
    "a truncated weights file": (None, r"model\.safetensors is damaged"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_checkpoint_that_cannot_be_read_stops_with_its_name_and_is_never_deleted(tmp_path, damage):
    model, optimizer = model_and_optimizer(seed=0)
    newest = save(tmp_path, model, optimizer, step=4)
    change, message = DAMAGE[damage]
    shutil.rmtree(tmp_path / "recovery")
    if damage == "no optimizer file":
        (newest / "optimizer.safetensors").unlink()
    elif damage == "a truncated weights file":
        (newest / "model.safetensors").write_bytes((newest / "model.safetensors").read_bytes()[:40])
    else:
        break_state(newest, change)
    with pytest.raises(Unreadable, match=rf"checkpoints/step-00000004: .*{message}.*left as it is"):
        checkpoint = found(tmp_path)  # finding it fails, unless only reading its tensors can tell
        ckpt.restore(checkpoint[0], trainee(*model_and_optimizer(seed=1)))
    with pytest.raises(Unreadable):
        save(tmp_path, model, optimizer, step=8)  # pruning it would lose it: the save stops instead
    assert newest.is_dir()


def test_a_format_1_checkpoint_is_converted_once_and_nothing_written_is_a_pickle(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    folder = save(tmp_path, model, optimizer, step=2)
    # Format 1 as an earlier version wrote it: the optimizer state pickled by torch.save.
    for f in ("optimizer.safetensors", "optimizer.json"):
        (folder / f).unlink()
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    break_state(folder, lambda s: s.update(format_version=1))
    fresh_model, fresh_optimizer = model_and_optimizer(seed=1)
    [checkpoint] = found(tmp_path)
    ckpt.restore(checkpoint, trainee(fresh_model, fresh_optimizer))
    assert_same_optimizer_state(optimizer.state_dict(), fresh_optimizer.state_dict())
    save(tmp_path, fresh_model, fresh_optimizer, step=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000003"]  # the old one superseded
    assert pickles(tmp_path) == []


def pickles(root: Path) -> list[str]:
    """Files under `root` that hold a pickle: one whole pickle stream, or torch.save's zip with a data.pkl."""
    return [str(f.relative_to(root)) for f in sorted(root.rglob("*")) if f.is_file() and is_pickle(f.read_bytes())]


def is_pickle(data: bytes) -> bool:
    if data[:2] == b"PK":
        return b"data.pkl" in data
    try:
        return data[:1] == b"\x80" and [op.name for op, _, _ in pickletools.genops(data)][-1] == "STOP"
    except Exception:  # not a pickle stream
        return False


def test_the_pickle_check_tells_pickles_from_safetensors(tmp_path):
    model, optimizer = model_and_optimizer(seed=0)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"a": 1}))
    folder = save(tmp_path, model, optimizer, step=1)
    assert pickles(tmp_path) == ["optimizer.pt", "raw.pkl"] and (folder / "model.safetensors").exists()


def test_a_kill_while_an_old_checkpoint_is_deleted_leaves_no_checkpoint_with_files_missing(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer(seed=0)
    save(tmp_path, model, optimizer, step=2)
    real_rmtree = shutil.rmtree

    def killed_halfway(path, ignore_errors=False):
        if (Path(path) / "state.json").exists():  # deleting a whole checkpoint
            (Path(path) / "state.json").unlink()  # the first file is gone, then the process dies
            raise KeyboardInterrupt("killed while pruning")
        real_rmtree(path, ignore_errors=ignore_errors)
    monkeypatch.setattr(shutil, "rmtree", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, model, optimizer, step=4)
    monkeypatch.undo()
    assert [c.step for c in found(tmp_path)] == [4, 2]  # the half-deleted copy is a leftover, not a checkpoint
    save(tmp_path, model, optimizer, step=6)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000006"]
    assert [p.name for p in (tmp_path / "recovery").iterdir()] == ["step-00000006"]


def test_a_save_reads_each_checkpoint_folder_once(tmp_path, monkeypatch):
    model, optimizer = model_and_optimizer(seed=0)
    save(tmp_path, model, optimizer, step=2)
    reads = []
    real = store.read_state

    def counted(folder):
        reads.append(Path(folder).relative_to(tmp_path).as_posix())
        return real(folder)
    monkeypatch.setattr(store, "read_state", counted)
    save(tmp_path, model, optimizer, step=4)
    # the new checkpoint, its recovery copy, and the step-2 checkpoint in both places before they are pruned
    assert sorted(reads) == ["checkpoints/step-00000002", "checkpoints/step-00000004",
                             "recovery/step-00000002", "recovery/step-00000004"]
    assert [c.step for c in found(tmp_path)] == [4]
