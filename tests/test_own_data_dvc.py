"""Own data under the real `dvc` CLI, as the README's "Using your own data" sets it up: raw files added to DVC
(`dvc add data/raw`), a weighted mixture of plain text sources with a validation source, and no held-out prompts
(`evaluate.prompts_path: ""`), all with no edit to dvc.yaml."""

import json

import pytest
from dvc_helpers import new_project, run, set_params
from test_pipeline_dvc import TINY_PARAMS, pytestmark, ran  # noqa: F401

PARAGRAPHS = {"a.txt": 12, "b.txt": 8, "val.txt": 5}


def paragraphs(name: str, n: int) -> str:
    return "".join(f"{name} paragraph {i}: the numbers {i} and {i + 1} add up to {2 * i + 1}.\n\n" for i in range(n))


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("own-data")
    repo = new_project(root / "project", root / "remote", TINY_PARAMS)
    (repo / "data" / "raw").mkdir(parents=True)
    for name, n in PARAGRAPHS.items():
        (repo / "data" / "raw" / name).write_text(paragraphs(name, n))
    set_params(repo, {"render": {"data_path": "data/raw", "validation_path": "data/raw/val.txt",
                                 "sources": [{"path": "data/raw/a.txt", "weight": 2}, {"path": "data/raw/b.txt"}]},
                      "train": {"total_step_budget": 3, "steps_today": 0},
                      "evaluate": {"prompts_path": ""}})
    run(repo, "dvc", "add", "-q", "data/raw")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-q", "-m", "own data")
    return repo


def test_a_mixture_of_plain_text_without_held_out_prompts_runs_under_dvc_repro(repo):
    out = run(repo, "dvc", "repro")
    for stage in ("render", "tokenizer", "tokenize", "train", "evaluate"):
        assert ran(out, stage), out
    stats = json.loads((repo / "data/rendered/stats.json").read_text())
    assert [(s["path"], s["weight"], s["validation"], s["records"]) for s in stats["sources"]] == [
        ("data/raw/a.txt", 2.0, False, 12), ("data/raw/b.txt", 1.0, False, 8), ("data/raw/val.txt", 1.0, True, 5)]
    meta = json.loads((repo / "data/tokens/meta.json").read_text())
    assert meta["splits"]["train"]["documents"] == 2 * 12 + 8 and meta["splits"]["val"]["documents"] == 5
    metrics = json.loads((repo / "outputs/eval/metrics.json").read_text())["eval"]
    assert metrics["n_prompts"] == 0 and metrics["exact_match"] is None and metrics["val_loss"] > 0


def test_dvc_tracks_every_source(repo):
    status = run(repo, "dvc", "status")
    assert "render" not in status and "tokenize" not in status, status  # only train, always changed, is listed
    with open(repo / "data/raw/b.txt", "a") as f:
        f.write("one more paragraph.\n")
    run(repo, "dvc", "add", "-q", "data/raw")
    status = run(repo, "dvc", "status")
    assert "render:" in status and "changed deps" in status and "data/raw" in status, status
