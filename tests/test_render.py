"""Render stage: every input shape, the messy cases, bad-input errors, templates and determinism."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tokenizer, unmarked

from stages.lib.base.errors import UserError
from stages.lib.base.params import parse_params
from stages.lib.ingest import chat_templates as templates
from stages.render import render

REPO = Path(__file__).resolve().parents[1]

ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n")
ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "Add.\n\n### Input:\n2 and 3\n\n### Response:\n")

# Phi-3 style: every turn closed with <|end|>, the whole conversation closed with EOS.
END_WITH_EOS_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
# Marks the last assistant turn differently: earlier renderings are not prefixes of later ones.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}{% if loop.last and m['role'] == 'assistant' %}[final]{% endif %}"
    "{{ '<' + m['role'] + '>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Each test works in its own folder, with relative paths as a user would give them."""
    monkeypatch.chdir(tmp_path)


def write(path: str, content: str | bytes) -> str:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8", newline="")
    return path


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def run(data_path: str, **render_keys) -> tuple[list[dict], dict]:
    """Render into out/ and return (records, stats)."""
    tokenizer = render_keys.pop("tokenizer", None)
    raw = {"render": {"data_path": data_path, **render_keys}}
    if tokenizer:
        raw["tokenizer"] = tokenizer
    render(parse_params(raw), "out")
    records = [json.loads(line) for line in Path("out/records.jsonl").read_text(encoding="utf-8").splitlines()]
    return records, json.loads(Path("out/stats.json").read_text(encoding="utf-8"))


def texts(records) -> list[str]:
    return ["".join(s["text"] for s in r["segments"]) for r in records]


def response_texts(record) -> list[str]:
    return [s["text"] for s in record["segments"] if s["response"]]


# ---- plain text -------------------------------------------------------------------------------------------------

def test_text_paragraphs_are_split_on_blank_lines():
    write("raw/a.txt", "First line\nsecond line\n\n\n   \nThird\n")
    records, stats = run("raw/a.txt")
    assert texts(records) == ["First line\nsecond line", "Third"]
    assert [r["source"] for r in records] == ["raw/a.txt:1", "raw/a.txt:6"]
    assert all(r["kind"] == "text" and r["segments"][0]["response"] for r in records)
    assert all(len(r["segments"]) == 1 for r in records)
    assert stats["formats"] == {"raw/a.txt": "text"} and stats["templates"] == []


def test_text_split_line_and_file():
    write("raw/a.txt", "one\ntwo\n\nthree\n\n")
    lines, _ = run("raw/a.txt", text_split="line")
    assert texts(lines) == ["one", "two", "three"]
    assert [r["source"] for r in lines] == ["raw/a.txt:1", "raw/a.txt:2", "raw/a.txt:4"]
    whole, _ = run("raw/a.txt", text_split="file")
    assert texts(whole) == ["one\ntwo\n\nthree"]


def test_messy_text_bom_crlf_and_no_final_newline_read_like_clean_text():
    write("clean/a.txt", "alpha\nbeta\n\ngamma\n")
    clean, _ = run("clean/a.txt")
    write("messy/a.txt", b"\xef\xbb\xbfalpha\r\nbeta\r\n\r\ngamma")
    messy, _ = run("messy/a.txt")
    assert texts(messy) == texts(clean) == ["alpha\nbeta", "gamma"]


def test_non_utf8_text_names_the_line_or_skips_the_paragraph():
    write("raw/a.txt", b"good\n\nbad \xff here\nstill bad paragraph\n\nfine\n")
    with pytest.raises(UserError, match=r"raw/a\.txt:3: bytes that are not UTF-8"):
        run("raw/a.txt")
    records, stats = run("raw/a.txt", on_error="skip")
    assert texts(records) == ["good", "fine"]
    assert stats["records_skipped"] == 1 and stats["skipped"][0]["line"] == 3


# ---- instruction data -------------------------------------------------------------------------------------------

def test_instruction_jsonl_uses_the_alpaca_prompt_with_and_without_input():
    write("raw/i.jsonl", jsonl({"instruction": "Say hi.", "input": "", "output": "hi"},
                               {"instruction": "Add.", "input": "2 and 3", "output": "5"},
                               {"instruction": "Say hi.", "output": "hello"},
                               {"instruction": "Say hi.", "input": None, "output": "hey"}))
    records, stats = run("raw/i.jsonl")
    assert records[0]["segments"] == [{"text": ALPACA_NO_INPUT, "response": False}, {"text": "hi", "response": True}]
    assert records[1]["segments"] == [{"text": ALPACA_WITH_INPUT, "response": False},
                                      {"text": "5", "response": True}]
    assert records[2]["segments"][0]["text"] == records[3]["segments"][0]["text"] == ALPACA_NO_INPUT
    assert all(r["kind"] == "instruction" for r in records)
    assert stats["formats"] == {"raw/i.jsonl": "instruction"} and stats["templates"] == ["alpaca"]


def test_empty_output_is_kept_as_an_empty_response():
    write("raw/i.jsonl", jsonl({"instruction": "Say nothing.", "output": ""}))
    records, _ = run("raw/i.jsonl")
    assert records[0]["segments"][-1] == {"text": "", "response": True}


def test_instruction_json_array_with_bom_crlf_and_extra_fields():
    array = json.dumps([{"instruction": "Add.", "input": "2 and 3", "output": "5", "id": 7, "meta": {"x": 1}},
                        {"instruction": "Two\r\nlines", "output": "a\r\nb"}], indent=1).replace("\n", "\r\n")
    write("raw/i.json", "\ufeff" + array)
    records, _ = run("raw/i.json")
    assert [r["source"] for r in records] == ["raw/i.json[0]", "raw/i.json[1]"]
    assert records[0]["segments"][0]["text"] == ALPACA_WITH_INPUT
    assert response_texts(records[1]) == ["a\nb"]
    assert "Two\nlines" in records[1]["segments"][0]["text"] and "\r" not in texts(records)[1]


def test_jsonl_with_blank_lines_crlf_and_no_final_newline():
    write("raw/i.json", '\r\n{"instruction": "Say hi.", "output": "hi"}\r\n\r\n   \r\n'
                        '{"instruction": "Say hi.", "output": "yo"}')
    records, _ = run("raw/i.json")  # a .json file holding JSONL is read as JSONL
    assert [r["source"] for r in records] == ["raw/i.json:2", "raw/i.json:5"]
    assert [response_texts(r) for r in records] == [["hi"], ["yo"]]


def test_instruction_data_with_chatml_template_becomes_a_user_assistant_exchange():
    write("raw/i.jsonl", jsonl({"instruction": "Add.", "input": "2 and 3", "output": "5"}))
    records, stats = run("raw/i.jsonl", template="chatml")
    assert unmarked(records[0]["segments"]) == [
        {"text": "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n", "response": False},
        {"text": "5<|im_end|>", "response": True}, {"text": "\n", "response": False}]
    assert stats["templates"] == ["chatml"]


# ---- chat data --------------------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "times 2?"},
        {"role": "assistant", "content": "10"}]
CHATML_SEGMENTS = [
    {"text": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n",
     "response": False},
    {"text": "5<|im_end|>", "response": True},
    {"text": "\n<|im_start|>user\ntimes 2?<|im_end|>\n<|im_start|>assistant\n", "response": False},
    {"text": "10<|im_end|>", "response": True},
    {"text": "\n", "response": False}]


def test_chat_messages_render_as_chatml_with_answers_marked():
    write("raw/c.jsonl", jsonl({"id": 1, "messages": CHAT}))
    records, stats = run("raw/c.jsonl")
    assert records[0]["kind"] == "chat" and records[0]["source"] == "raw/c.jsonl:1"
    assert unmarked(records[0]["segments"]) == CHATML_SEGMENTS
    assert stats["templates"] == ["chatml"] and stats["formats"] == {"raw/c.jsonl": "chat"}


def test_sharegpt_conversations_map_to_roles():
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = [{"from": names[m["role"]], "value": m["content"]} for m in CHAT]
    sharegpt[1]["from"] = "user"  # "user" and "assistant" are accepted as well
    write("raw/c.jsonl", jsonl({"conversations": sharegpt}))
    records, _ = run("raw/c.jsonl")
    assert unmarked(records[0]["segments"]) == CHATML_SEGMENTS


def test_crlf_inside_chat_contents_is_normalised():
    write("raw/c.jsonl", jsonl({"messages": [{"role": "user", "content": "a\r\nb"},
                                             {"role": "assistant", "content": "c\r\nd"}]}))
    records, _ = run("raw/c.jsonl")
    assert response_texts(records[0]) == ["c\nd<|im_end|>"]
    assert "\r" not in texts(records)[0]


def test_chat_prompt_chatml_ends_with_the_assistant_header():
    prompt = templates.chat_prompt(CHAT[:4], "chatml")
    assert prompt == "".join(s["text"] for s in CHATML_SEGMENTS[:3])


def test_alpaca_template_refuses_chat_data():
    write("raw/c.jsonl", jsonl({"messages": CHAT}))
    with pytest.raises(UserError, match=r"raw/c\.jsonl.*chat data.*alpaca"):
        run("raw/c.jsonl", template="alpaca")


# ---- bad records ------------------------------------------------------------------------------------------------

BAD_CASES = [
    ('{"instruction": "x", "output": "y"\n', r"malformed JSON"),
    ('{"instruction": "x"}\n', r"missing field 'output'"),
    ('{"instruction": "x", "output": 5}\n', r"field 'output' is a number; expected a string"),
    ('{"instruction": ["x"], "output": "y"}\n', r"field 'instruction' is a list"),
    ('[1, 2]\n', r"expected a JSON object"),
]


@pytest.mark.parametrize("bad_line, problem", BAD_CASES)
def test_bad_instruction_record_stops_with_file_and_line(bad_line, problem):
    good = jsonl({"instruction": "Say hi.", "output": "hi"})
    write("raw/i.jsonl", good + "\n" + bad_line + good)
    with pytest.raises(UserError, match=rf"raw/i\.jsonl:3: {problem}.*on_error: skip"):
        run("raw/i.jsonl")


@pytest.mark.parametrize("bad_line, problem", BAD_CASES)
def test_bad_instruction_record_is_skipped_and_counted(bad_line, problem):
    good = jsonl({"instruction": "Say hi.", "output": "hi"})
    write("raw/i.jsonl", good + "\n" + bad_line + good)
    records, stats = run("raw/i.jsonl", on_error="skip")
    assert [r["source"] for r in records] == ["raw/i.jsonl:1", "raw/i.jsonl:4"]
    assert stats["records_read"] == 3 and stats["records_written"] == 2 and stats["records_skipped"] == 1
    assert len(stats["skipped"]) == 1
    entry = stats["skipped"][0]
    assert (entry["file"], entry["line"]) == ("raw/i.jsonl", 3)
    assert re.search(problem, entry["problem"])


def test_unknown_role_is_an_error_and_skippable():
    write("raw/c.jsonl", jsonl({"messages": CHAT},
                               {"messages": [{"role": "narrator", "content": "x"}]},
                               {"conversations": [{"from": "moderator", "value": "x"}]}))
    with pytest.raises(UserError, match=r"raw/c\.jsonl:2: messages\[0\] has unknown role 'narrator'.*render\.roles"):
        run("raw/c.jsonl")
    records, stats = run("raw/c.jsonl", on_error="skip")
    assert len(records) == 1
    assert [(s["line"], "unknown" in s["problem"]) for s in stats["skipped"]] == [(2, True), (3, True)]


def test_non_utf8_jsonl_line_is_named():
    good = jsonl({"instruction": "Say hi.", "output": "hi"}).encode()
    write("raw/i.jsonl", good + b'{"instruction": "caf\xe9", "output": "x"}\n' + good)
    with pytest.raises(UserError, match=r"raw/i\.jsonl:2: bytes that are not UTF-8"):
        run("raw/i.jsonl")


def test_json_array_errors_name_the_element_and_the_line_it_starts_on():
    write("raw/a.json", json.dumps([{"instruction": "Say hi.", "output": "hi"}, {"instruction": "x"}], indent=1))
    with pytest.raises(UserError, match=r"raw/a\.json\[1\] \(element 1 of the JSON array, counting from 0, starting "
                                        r"at line 6\).*missing field 'output'"):
        run("raw/a.json")
    records, stats = run("raw/a.json", on_error="skip")
    assert len(records) == 1
    problem = stats["skipped"][0]["problem"]
    assert stats["skipped"] == [{"file": "raw/a.json", "record": 1, "line": 6, "problem": problem}]
    write("raw/a.json", '[\n{"instruction": "Say hi.", "output": "hi"},\n{"instruction": oops}\n]')
    with pytest.raises(UserError, match=r"raw/a\.json\[1\] .*starting at line 3\): the JSON array does not parse "
                                        r"\(Expecting value, line 3\)"):
        run("raw/a.json")


def test_a_broken_json_array_keeps_the_elements_before_the_break_and_counts_the_rest():
    write("raw/a.json", '[{"instruction": "x", "output": "y"},\n {"instruction": "z", "output": ')
    write("raw/b.jsonl", jsonl({"instruction": "Say hi.", "output": "hi"}))
    records, stats = run("raw", on_error="skip")
    assert [r["source"] for r in records] == ["raw/a.json[0]", "raw/b.jsonl:1"]
    assert stats["records_skipped"] == 1
    assert stats["skipped"][0]["file"] == "raw/a.json" and stats["skipped"][0]["line"] == 2
    assert "cannot be read until it is fixed" in stats["skipped"][0]["problem"]


def test_lone_surrogate_is_a_bad_record():
    write("raw/i.jsonl", '{"instruction": "x\\ud800", "output": "y"}\n')
    with pytest.raises(UserError, match=r"raw/i\.jsonl:1: .*surrogate"):
        run("raw/i.jsonl")


def test_a_record_of_unknown_shape_is_reported():
    write("raw/x.jsonl", jsonl({"question": "q", "answer": "a"}))
    with pytest.raises(UserError, match=r"raw/x\.jsonl:1: a record that is neither chat data"):
        run("raw/x.jsonl")


def test_nothing_rendered_is_an_error_and_keeps_the_previous_output():
    write("raw/i.jsonl", jsonl({"instruction": "Say hi.", "output": "hi"}))
    run("raw/i.jsonl")
    before = Path("out/records.jsonl").read_bytes()
    write("raw/i.jsonl", "not json\n")
    with pytest.raises(UserError, match="no records were rendered"):
        run("raw/i.jsonl", on_error="skip")
    assert Path("out/records.jsonl").read_bytes() == before
    assert sorted(p.name for p in Path("out").iterdir()) == ["records.jsonl", "stats.json"]


# ---- finding files, formats, determinism ------------------------------------------------------------------------

def test_folder_reads_data_files_of_its_subfolders_in_sorted_order_skips_hidden_ones_and_detects_formats():
    write("raw/b.jsonl", jsonl({"messages": CHAT}))
    write("raw/a.json", json.dumps([{"instruction": "Say hi.", "output": "hi"}]))
    write("raw/c.txt", "some text\n")
    write("raw/notes.md", "# not data\n")
    write("raw/sub/2024/d.txt", "in a subfolder\n")
    write("raw/sub/e.txt", "next to it\n")
    write("raw/.cache/x.txt", "hidden folder\n")
    write("raw/sub/.hidden.txt", "hidden file\n")
    records, stats = run("raw")
    assert [r["source"] for r in records] == ["raw/a.json[0]", "raw/b.jsonl:1", "raw/c.txt:1",
                                              "raw/sub/2024/d.txt:1", "raw/sub/e.txt:1"]
    assert stats["formats"] == {"raw/a.json": "instruction", "raw/b.jsonl": "chat", "raw/c.txt": "text",
                                "raw/sub/2024/d.txt": "text", "raw/sub/e.txt": "text"}
    assert stats["templates"] == ["alpaca", "chatml"]
    assert stats["records_written"] == 5 and stats["characters"] == sum(map(len, texts(records)))


def test_glob_and_forced_format():
    write("raw/x1.txt", "one\n")
    write("raw/x2.txt", "two\n")
    write("raw/y.txt", "three\n")
    records, _ = run("raw/x*.txt")
    assert texts(records) == ["one", "two"]
    write("raw/lines.jsonl", jsonl({"instruction": "Say hi.", "output": "hi"}))
    records, _ = run("raw/lines.jsonl", format="text")
    assert records[0]["kind"] == "text" and texts(records) == ['{"instruction": "Say hi.", "output": "hi"}']


@pytest.mark.parametrize("data_path, message", [("nowhere", "does not exist"), ("raw/*.csv", "matches no file"),
                                                ("empty", "a folder with no data file in it")])
def test_data_path_that_names_no_data_is_a_clear_error(data_path, message):
    Path("empty").mkdir()
    with pytest.raises(UserError, match=message):
        run(data_path)


def test_output_is_deterministic():
    write("raw/a.txt", "x\n\ny\n")
    write("raw/b.jsonl", jsonl({"messages": CHAT}, {"instruction": "Say hi.", "output": "é"}))
    write("raw/c.jsonl", "oops\n")
    run("raw", on_error="skip")
    first = [Path("out", name).read_bytes() for name in ("records.jsonl", "stats.json")]
    run("raw", on_error="skip")
    assert [Path("out", name).read_bytes() for name in ("records.jsonl", "stats.json")] == first


# ---- HuggingFace chat templates ---------------------------------------------------------------------------------

def make_hf_tokenizer(folder: str, chat_template: str | None) -> str:
    """A tiny BPE tokenizer folder saved the HuggingFace way, optionally with a chat template."""
    save_tokenizer(Path(folder), corpus=["hello world 2+3 is 5"] * 4, specials=("</s>",), eos="</s>",
                   chat_template=chat_template)
    return folder


def hf(folder: str) -> dict:
    return {"tokenizer_type": "huggingface", "tokenizer_path": folder}


def test_tokenizer_chat_template_spans_and_final_eos():
    make_hf_tokenizer("tok", END_WITH_EOS_TEMPLATE)
    write("raw/c.jsonl", jsonl({"messages": CHAT}))
    records, stats = run("raw/c.jsonl", tokenizer=hf("tok"))  # auto picks the tokenizer's template
    assert unmarked(records[0]["segments"]) == [
        {"text": "<|system|>\nBe brief.<|end|>\n<|user|>\n2+3?<|end|>\n<|assistant|>\n", "response": False},
        {"text": "5<|end|>\n", "response": True},
        {"text": "<|user|>\ntimes 2?<|end|>\n<|assistant|>\n", "response": False},
        {"text": "10<|end|>\n", "response": True}]  # the closing EOS is left to the tokenize stage
    assert stats["templates"] == ["tokenizer"]

    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained("tok")
    assert templates.chat_prompt(CHAT[:4], "tokenizer", tokenizer) == "".join(
        s["text"] for s in records[0]["segments"][:3])


def test_tokenizer_without_chat_template():
    make_hf_tokenizer("tok", None)
    write("raw/c.jsonl", jsonl({"messages": CHAT}))
    records, stats = run("raw/c.jsonl", tokenizer=hf("tok"))
    assert stats["templates"] == ["chatml"] and unmarked(records[0]["segments"]) == CHATML_SEGMENTS
    with pytest.raises(UserError, match="has no chat template"):
        run("raw/c.jsonl", template="tokenizer", tokenizer=hf("tok"))


def test_template_that_is_not_prefix_stable_is_refused_even_with_skip():
    make_hf_tokenizer("tok", UNSTABLE_TEMPLATE)
    write("raw/c.jsonl", jsonl({"messages": CHAT}))
    with pytest.raises(UserError, match=r"raw/c\.jsonl:1: .*not prefix-stable.*render\.template: chatml"):
        run("raw/c.jsonl", template="tokenizer", tokenizer=hf("tok"), on_error="skip")


# ---- command line -----------------------------------------------------------------------------------------------

def test_cli_reports_a_bad_record_without_traceback():
    write("params.yaml", "render:\n  data_path: raw/i.jsonl\n")
    write("raw/i.jsonl", '{"instruction": "x", "output": "y"}\n{broken\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.render"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 1
    assert "raw/i.jsonl:2: malformed JSON" in done.stderr and "Traceback" not in done.stderr
    assert not Path("data/rendered/records.jsonl").exists()
