"""Nothing to do costs nothing: a session whose budget is spent answers before importing torch, and that quick
answer is the one the full decision gives."""

import shutil
import subprocess
import sys

import pytest
from train_helpers import inside, make_workspace, session, stage_env, tiny_params, write_params

from stages.lib.checkpointing.store import RECOVERY_DIR
from stages.lib.tokenizing.batches import split_samples
from stages.lib.tokenizing.token_files import packing_for, read_meta
from stages.lib.training.preflight import nothing_to_train
from stages.lib.training.trainer import decide_on_main

SPENT_STAGE_IMPORTS_NO_TORCH = """
import sys
from stages.train import main
main()
heavy = sorted(m for m in ("torch", "transformers", "dvclive") if m in sys.modules)
print("imported:", heavy)
"""


@pytest.fixture(scope="module")
def spent(tmp_path_factory):
    """A workspace whose run of 12 steps is done."""
    root = make_workspace(tmp_path_factory.mktemp("spent"))
    session(root)
    return root


def full_answer(root, train):
    """Whether the full decision (with the tokenizer's facts) finds nothing to train, and what it resumes."""
    with inside(root):
        meta = read_meta("data/tokens")
        samples = split_samples("data/tokens", "train", train.seq_len, packing_for(meta, train.packing), train.seed,
                                required=True).count
        decision = decide_on_main(train, meta, samples, "data/tokenizer", RECOVERY_DIR, False, 1)
    spent = decision.start_step >= decision.plan.total_steps and not decision.from_recovery
    return spent, decision


def quick_answer(root, train):
    with inside(root):
        return nothing_to_train(train)


@pytest.mark.parametrize("change", [
    {}, {"steps_today": 3, "save_every": 7}, {"total_step_budget": 14}, {"total_step_budget": 9},
    {"lr": 0.02}, {"schedule": "wsd"}, {"resume": "never"}, {"devices": "auto"},
])
def test_the_quick_answer_is_the_full_decisions(spent, tmp_path, change):
    root = tmp_path / "workspace"
    shutil.copytree(spent, root)
    train = tiny_params(**change)
    quick = quick_answer(root, train)
    spent_fully, full = full_answer(root, train)
    assert (quick is not None) == (spent_fully and train.resume != "never")
    if quick is not None:
        assert (quick.plan, quick.resume, quick.messages) == (full.plan, full.resume, full.messages)


def test_the_quick_answer_leaves_the_work_to_the_full_path_when_files_must_change(spent, tmp_path):
    root = tmp_path / "workspace"
    shutil.copytree(spent, root)
    train = tiny_params()
    shutil.rmtree(root / "models")  # DVC deleted the export: only the full path rebuilds it
    assert quick_answer(root, train) is None
    shutil.copytree(spent / "models", root / "models")
    shutil.rmtree(root / "checkpoints")  # `dvc exp run` put back an older checkpoint, or none: recovery copy wins
    assert quick_answer(root, train) is None
    assert full_answer(root, train)[1].from_recovery


def test_epoch_budgets_are_counted_alike(tmp_path):
    root = make_workspace(tmp_path)
    train = tiny_params(total_step_budget=0, epochs=1, save_every=100, eval_every=100)
    session(root, total_step_budget=0, epochs=1, save_every=100, eval_every=100)
    quick = quick_answer(root, train)
    assert quick is not None and quick.plan.total_steps == full_answer(root, train)[1].plan.total_steps == 31


def test_a_spent_session_answers_without_importing_torch(spent, tmp_path):
    root = tmp_path / "workspace"
    shutil.copytree(spent, root)
    write_params(root)
    done = subprocess.run([sys.executable, "-c", SPENT_STAGE_IMPORTS_NO_TORCH], cwd=root, env=stage_env(),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "the run's budget of 12 steps is spent" in done.stdout
    assert "raise train.total_step_budget" in done.stdout
    assert "imported: []" in done.stdout


def test_a_spent_lora_fine_tune_answers_without_importing_torch_and_a_new_export_kind_takes_the_full_path(tmp_path):
    from test_families import base_model
    base_model("llama", tmp_path / "base")
    run = {"init_from": str(tmp_path / "base"), "lora": {"r": 4, "alpha": 8.0}, "total_step_budget": 4,
           "export": "adapter"}
    root = make_workspace(tmp_path / "w")
    session(root, **run)

    def spent_run(**changes):
        write_params(root, **{**run, **changes})
        done = subprocess.run([sys.executable, "-c", SPENT_STAGE_IMPORTS_NO_TORCH], cwd=root, env=stage_env(),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "the run's budget of 4 steps is spent" in done.stdout
        return done.stdout

    assert "imported: []" in spent_run()  # the base's content hash and the adapter export need no torch
    out = spent_run(export="merged")  # the export asked for is not there: the full path rebuilds it
    assert "re-exported the model at step 4" in out and "imported: []" not in out
    assert (root / "models" / "tiny" / "config.json").is_file()
