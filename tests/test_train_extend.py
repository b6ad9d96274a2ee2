"""Extending a run: a larger budget continues the run from its checkpoint instead of starting a new one.

With wsd, an extension before the decay has begun is exact, and after it the run continues exactly from the
checkpoint kept where the decay began; with cosine the remaining steps are re-planned from the rate reached.
"""

import json
import shutil

import pytest
from train_helpers import checkpoint_step, make_workspace, read_tsv, session, tree_bytes

from stages.lib.training.schedule import Schedule

WSD = {"schedule": "wsd", "decay_steps": 4, "save_every": 5}
METRICS = ("train/loss", "lr", "grad_norm")  # val/loss also has rows where a session ended


@pytest.fixture(scope="module")
def wsd_reference(tmp_path_factory):
    """A wsd run of 12 steps (decay over steps 8..12) set up that way from the start, in one session."""
    root = make_workspace(tmp_path_factory.mktemp("wsd-reference"))
    assert session(root, total_step_budget=12, **WSD).end_step == 12
    return root


def checkpoint_folders(root):
    return sorted(p.name for p in (root / "checkpoints").iterdir())


def state(root, step):
    return json.loads((root / "checkpoints" / f"step-{step:08d}" / "state.json").read_text())


def assert_same_as(root, reference):
    assert tree_bytes(root / "models") == tree_bytes(reference / "models")
    for metric in METRICS:
        assert read_tsv(root, metric) == read_tsv(reference, metric), metric


def test_wsd_extended_before_its_decay_continues_exactly(wsd_reference, tmp_path, capsys):
    root = make_workspace(tmp_path)
    session(root, total_step_budget=8, steps_today=3, **WSD)  # decay would begin at step 4
    capsys.readouterr()
    result = session(root, total_step_budget=12, **WSD)
    assert (result.start_step, result.end_step) == (3, 12)
    out = capsys.readouterr().out
    assert "the run's plan changed (total_step_budget: 8 -> 12)" in out
    assert "continuing exactly from step 3" in out
    assert_same_as(root, wsd_reference)
    first, last = state(root, 12), state(wsd_reference, 12)
    assert (first["run"], first["fingerprint"]) == (last["run"], last["fingerprint"])


def test_wsd_extended_after_its_decay_continues_from_the_checkpoint_kept_where_it_began(wsd_reference, tmp_path,
                                                                                         capsys):
    root = make_workspace(tmp_path)
    session(root, total_step_budget=8, **WSD)  # saves at 4 (the decay begins), 5 and 8
    assert checkpoint_folders(root) == ["step-00000004", "step-00000008"]
    assert state(root, 4)["pre_decay"] and not state(root, 8)["pre_decay"]
    assert sorted(p.name for p in (root / ".checkpoint-recovery").iterdir()) == checkpoint_folders(root)
    capsys.readouterr()
    result = session(root, total_step_budget=12, **WSD)
    assert (result.start_step, result.end_step) == (4, 12)
    assert "continuing exactly from the checkpoint kept there, so steps 4..8 are trained again" in (
        capsys.readouterr().out)
    assert_same_as(root, wsd_reference)
    assert [step for step, _ in read_tsv(root, "train/loss")] == list(range(1, 13))
    assert checkpoint_folders(root) == ["step-00000008", "step-00000012"]  # the new run's decay begins at 8


def test_a_spent_cosine_run_extended_continues_with_the_rate_replanned_and_sessions_still_split_exactly(tmp_path,
                                                                                                         capsys):
    one, two = make_workspace(tmp_path / "one"), make_workspace(tmp_path / "two")
    for root in (one, two):
        session(root, total_step_budget=8, steps_today=5)
    old = Schedule.from_json(state(one, 5)["schedule"])
    capsys.readouterr()
    assert session(one, total_step_budget=12).start_step == 5
    assert "re-planned over the remaining steps: cosine to min_lr at step 12, from" in capsys.readouterr().out
    session(two, total_step_budget=12, steps_today=3)
    assert session(two, total_step_budget=12).start_step == 8  # the re-planned curve is followed, not re-planned again
    assert_same_as(two, one)

    recorded = Schedule.from_json(state(one, 12)["schedule"])
    assert recorded == Schedule.planned("cosine", 12, 1e-2, 1e-3, 2).replanned(5, old.lr_at(5), 2)
    logged = [float(value) for step, value in read_tsv(one, "lr") if step > 5]
    assert logged == pytest.approx([recorded.lr_at(s) for s in range(5, 12)])
    assert logged[0] == pytest.approx(old.lr_at(5))  # no jump where it was extended
    assert logged[-1] == pytest.approx(1e-3)

    # The case: a finished run given a few more steps keeps its weights and trains on at min_lr.
    session(one, total_step_budget=14)
    assert checkpoint_step(one) == 14
    assert [float(v) for s, v in read_tsv(one, "lr") if s > 12] == pytest.approx([1e-3, 1e-3])


def test_other_settings_still_start_a_new_run_and_shrinking_a_spent_budget_trains_nothing(tmp_path, capsys):
    root = make_workspace(tmp_path)
    session(root, total_step_budget=6, **WSD)
    assert session(root, total_step_budget=5, **WSD).stopped_by == "nothing-to-do"
    capsys.readouterr()
    assert session(root, total_step_budget=8, steps_today=1, seed=7, **WSD).start_step == 0
    assert "belongs to a different run; changed: seed: 1337 -> 7" in capsys.readouterr().out


def test_checkpoints_without_a_recorded_schedule_resume_as_the_cosine_run_they_were(tmp_path):
    root = make_workspace(tmp_path)
    session(root, steps_today=4)
    whole = make_workspace(tmp_path / "whole")
    session(whole)
    for folder in ("checkpoints", ".checkpoint-recovery"):
        path = root / folder / "step-00000004" / "state.json"
        legacy = json.loads(path.read_text())
        for key in ("run", "schedule", "pre_decay"):
            del legacy[key]
        for key in ("schedule", "decay_steps", "decay_fraction"):
            del legacy["fingerprint_values"][key]
        path.unlink()  # a hardlinked copy: write a new file
        path.write_text(json.dumps(legacy))
    assert session(root).start_step == 4
    assert_same_as(root, whole)
    shutil.rmtree(whole)


def test_more_epochs_extend_the_run_too(tmp_path, capsys):
    root = make_workspace(tmp_path)
    epochs = {"total_step_budget": 0, "save_every": 100, "eval_every": 100, "schedule": "wsd"}
    assert session(root, epochs=1, **epochs).end_step == 31  # 124 windows of 16 tokens, 4 a step
    capsys.readouterr()
    result = session(root, epochs=2, **epochs)
    assert (result.start_step, result.end_step) == (25, 62)  # from the checkpoint where epoch 1's decay began
    assert "the run's plan changed (epochs: 1 -> 2)" in capsys.readouterr().out
