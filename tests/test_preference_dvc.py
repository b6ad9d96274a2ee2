"""DPO with a precomputed reference through the real `dvc` CLI: the reference stage scores the pairs once, and DVC
reruns it when the pairs or the params it reads change, never for a training param alone."""

import json

import pytest
from dvc_helpers import checkpoint_step, needs_dvc, new_project, run, set_params
from test_families import base_model

pytestmark = [needs_dvc, pytest.mark.slow]

PAIRS = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"}
         for a in range(6) for b in range(4)]


def ran(output: str, stage: str) -> bool:
    return f"Running stage '{stage}'" in output


def skipped(output: str, stage: str) -> bool:
    return f"Stage '{stage}' didn't change, skipping" in output


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    params = {
        "render": {"data_path": "data/pairs"},
        "tokenizer": {"vocab_size": 300},
        "train": {"init_from": "base", "objective": "dpo", "reference": "precomputed", "seq_len": 32,
                  "batch_size": 4, "warmup_steps": 1, "total_step_budget": 2, "save_every": 100, "eval_every": 100,
                  "eval_batches": 1},
        "evaluate": {"max_val_tokens": 512, "num_prompts": 2, "max_new_tokens": 4},
    }
    repo = new_project(root / "project", root / "remote", params)
    (repo / "data" / "pairs").mkdir(parents=True)
    (repo / "data" / "pairs" / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    base_model("llama", repo / "base")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "pairs and base")
    return repo


def test_the_reference_stage_scores_the_pairs_and_dpo_trains_on_them(repo):
    out = run(repo, "dvc", "repro")
    assert ran(out, "reference") and ran(out, "train"), out
    facts = json.loads((repo / "data" / "reference" / "reference.json").read_text())
    assert facts["scores"] and facts["seq_len"] == 32
    assert (repo / "data" / "reference" / "train.logps.bin").stat().st_size > 0
    assert checkpoint_step(repo) == 2
    live = json.loads((repo / "outputs" / "live" / "metrics.json").read_text())
    assert "rewards" in live["train"] and "accuracy" in live["train"]["rewards"]


def test_a_training_param_alone_does_not_rerun_the_reference_stage(repo):
    set_params(repo, {"train": {"lr": 1e-3, "total_step_budget": 3, "beta": 0.2}})
    out = run(repo, "dvc", "repro")
    assert skipped(out, "reference") and ran(out, "train"), out


def test_the_pairs_seq_len_or_objective_rerun_it(repo):
    set_params(repo, {"train": {"seq_len": 24}})
    out = run(repo, "dvc", "repro", "reference")
    assert ran(out, "reference"), out
    assert json.loads((repo / "data" / "reference" / "reference.json").read_text())["seq_len"] == 24
    set_params(repo, {"train": {"objective": "orpo"}})
    out = run(repo, "dvc", "repro", "reference")
    assert ran(out, "reference"), out
    assert sorted(p.name for p in (repo / "data" / "reference").iterdir()) == ["reference.json"]
