"""The bundled sample data: generated deterministically, held-out set disjoint from training, renders cleanly."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from stages.lib.base.params import parse_params
from stages.render import render

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
GENERATED = ["sample/instructions.jsonl", "sample/chat.jsonl", "sample/notes.txt", "eval/heldout.jsonl"]


def load_generator():
    spec = importlib.util.spec_from_file_location("make_sample", DATA / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    load_generator().write_all(out)
    return out


def test_generator_is_deterministic_and_matches_the_committed_files(generated, tmp_path):
    load_generator().write_all(tmp_path)
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (generated / name).read_bytes(), name
        assert (DATA / name).read_bytes() == (generated / name).read_bytes(), \
            f"data/{name} differs from what data/make_sample.py writes: rerun it"
    assert sorted(p.name for p in (tmp_path / "sample").iterdir()) == ["chat.jsonl", "instructions.jsonl",
                                                                      "notes.txt"]


def test_sample_is_small_and_held_out_covers_every_task(generated):
    total = sum((generated / "sample" / name).stat().st_size for name in ("instructions.jsonl", "chat.jsonl",
                                                                           "notes.txt"))
    assert 300_000 < total < 5_000_000
    heldout = read_jsonl(generated / "eval/heldout.jsonl")
    assert 150 <= len(heldout) <= 250
    tasks = Counter(r["task"] for r in heldout)
    assert set(tasks) == {"add", "sub", "larger", "upper", "reverse", "count", "repeat"}
    assert all(set(r) == {"instruction", "input", "output", "task"} for r in heldout)


def test_chat_sample_is_multi_turn(generated):
    chats = read_jsonl(generated / "sample/chat.jsonl")
    assistant_turns = [sum(m["role"] == "assistant" for m in c["messages"]) for c in chats]
    assert min(assistant_turns) >= 2 and max(assistant_turns) >= 3


def numbers(record: dict) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", record["instruction"] + " " + record["input"]))


def test_held_out_answers_are_right(generated):
    for r in read_jsonl(generated / "eval/heldout.jsonl"):
        if r["task"] in ("add", "sub", "larger"):
            a, b = numbers(r)
            assert r["output"] == str({"add": a + b, "sub": a - b, "larger": max(a, b)}[r["task"]]), r
        elif r["task"] == "upper":
            assert r["output"].isupper() and r["output"].lower() in r["instruction"] + r["input"], r
        elif r["task"] == "reverse":
            assert r["output"][::-1] in r["instruction"] + r["input"], r
        elif r["task"] == "repeat":
            assert r["output"] in r["instruction"] + r["input"], r


def test_held_out_does_not_overlap_training(generated):
    heldout = read_jsonl(generated / "eval/heldout.jsonl")
    train = read_jsonl(generated / "sample/instructions.jsonl")
    chats = read_jsonl(generated / "sample/chat.jsonl")

    train_questions = {(r["instruction"], r["input"]) for r in train}
    assert not [r for r in heldout if (r["instruction"], r["input"]) in train_questions]

    user_turns = {m["content"] for c in chats for m in c["messages"] if m["role"] == "user"}
    as_chat = {f"{r['instruction']}\n\n{r['input']}" if r["input"] else r["instruction"] for r in heldout}
    assert not as_chat & user_turns

    arithmetic = {"add", "sub", "larger"}
    train_problems = {(r["task"], numbers(r)) for r in train if r["task"] in arithmetic}
    assert not [r for r in heldout if r["task"] in arithmetic and (r["task"], numbers(r)) in train_problems]

    # The made-up words of the held-out word tasks appear nowhere in the training files.
    word_of = {"upper": str.lower, "reverse": lambda s: s[::-1], "repeat": lambda s: s}
    held_words = {word_of[r["task"]](r["output"]) for r in heldout if r["task"] in word_of}
    assert len(held_words) > 50
    train_words = set()
    for name in ("instructions.jsonl", "chat.jsonl", "notes.txt"):
        train_words |= set(re.findall(r"[a-z]+", (generated / "sample" / name).read_text(encoding="utf-8").lower()))
    assert not held_words & train_words


def test_committed_sample_and_held_out_render_without_error(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    stats = render(parse_params({"render": {"data_path": "data/sample"}}), tmp_path / "sample")
    assert stats["records_skipped"] == 0 and stats["records_written"] > 5000
    assert stats["formats"] == {"data/sample/chat.jsonl": "chat", "data/sample/instructions.jsonl": "instruction",
                                "data/sample/notes.txt": "text"}
    assert stats["templates"] == ["alpaca", "chatml"]
    stats = render(parse_params({"render": {"data_path": "data/eval/heldout.jsonl"}}), tmp_path / "eval")
    assert stats["records_skipped"] == 0 and stats["formats"] == {"data/eval/heldout.jsonl": "instruction"}
