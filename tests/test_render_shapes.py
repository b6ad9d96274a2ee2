"""Render stage: the file shapes people have (one JSON object, records under a key, dotted field paths, a list of
conversations in one record), hostile records counted and located (too deep, too long, empty documents,
conversations ending on a user turn), and files whose bytes contradict their names."""

import bz2
import gzip
import json
from pathlib import Path

import pytest
import zstandard
from test_render import CHAT, CHATML_SEGMENTS, in_tmp, jsonl, run, texts, write  # noqa: F401

from stages.lib.base.errors import UserError
from stages.lib.base.params import parse_params
from stages.render import render

QUESTION = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]


# ---- one object, records under a key, dotted paths --------------------------------------------------------------

def test_a_json_file_holding_one_pretty_printed_conversation_is_one_record():
    write("raw/one.json", json.dumps({"messages": CHAT, "id": 7}, indent=2))
    records, stats = run("raw/one.json")
    assert len(records) == 1 and records[0]["segments"] == CHATML_SEGMENTS
    assert records[0]["source"] == "raw/one.json" and stats["formats"] == {"raw/one.json": "chat"}
    assert stats["fields_dropped"] == {"id": {"count": 1, "first": ["raw/one.json"]}}


def test_records_under_a_key_are_read_with_records_field():
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(3)]
    write("raw/d.json", json.dumps({"version": "1.0", "meta": {"n": 3}, "data": rows}, indent=1))
    records, _ = run("raw/d.json", records_field="data")
    assert [r["source"] for r in records] == ["raw/d.json[0]", "raw/d.json[1]", "raw/d.json[2]"]
    assert [r["segments"][-1]["text"] for r in records] == ["0", "1", "2"]
    with pytest.raises(UserError, match=r"raw/d\.json: render\.records_field = 'rows' is not a key of the JSON "
                                        r"object \(its keys: 'version', 'meta', 'data'\)"):
        run("raw/d.json", records_field="rows")
    with pytest.raises(UserError, match=r"raw/d\.json: a record that is neither.*'version', 'meta', 'data'"):
        run("raw/d.json")  # without records_field the object is one record, of no known shape


def test_a_pretty_printed_object_that_does_not_parse_is_read_as_lines():
    write("raw/x.jsonl", '{"instruction": "a",\n' + jsonl({"instruction": "Say hi.", "output": "hi"}))
    records, stats = run("raw/x.jsonl", on_error="skip")
    assert [r["source"] for r in records] == ["raw/x.jsonl:2"]
    assert stats["skipped"][0]["line"] == 1 and "malformed JSON" in stats["skipped"][0]["problem"]


def test_dotted_field_paths_and_a_list_of_conversations_give_one_record_each():
    nested = {"id": 1, "answer_generation": {"train_messages": [CHAT, QUESTION], "model": "m"}}
    write("raw/a.jsonl", jsonl(nested, {"answer_generation": {"train_messages": [QUESTION]}}))
    write("raw/b.json", json.dumps(nested, indent=2))
    fields = {"messages": "answer_generation.train_messages"}
    records, stats = run("raw", fields=fields)
    assert [r["source"] for r in records] == ["raw/a.jsonl:1[0]", "raw/a.jsonl:1[1]", "raw/a.jsonl:2[0]",
                                              "raw/b.json[0]", "raw/b.json[1]"]
    assert records[0]["segments"] == CHATML_SEGMENTS and records[1]["segments"][1]["text"] == "5<|im_end|>"
    assert stats["formats"] == {"raw/a.jsonl": "chat", "raw/b.json": "chat"}
    assert stats["fields_dropped"]["id"]["first"] == ["raw/a.jsonl:1[0]", "raw/a.jsonl:1[1]", "raw/b.json[0]",
                                                      "raw/b.json[1]"]
    write("raw/q.jsonl", jsonl({"q": {"text": "Say hi."}, "a": {"text": "hi"}}))
    records, _ = run("raw/q.jsonl", fields={"instruction": "q.text", "output": "a.text"})
    assert texts(records)[0].endswith("Say hi.\n\n### Response:\nhi")


def test_a_bad_conversation_in_a_list_is_located_by_its_index():
    bad = [{"role": "narrator", "content": "x"}]
    write("raw/a.jsonl", jsonl({"convs": [QUESTION, bad, QUESTION]}))
    with pytest.raises(UserError, match=r"raw/a\.jsonl:1\[1\] \(conversation 1 of the record's list\): "
                                        r"convs\[0\] has unknown role 'narrator'"):
        run("raw/a.jsonl", fields={"messages": "convs"})
    records, stats = run("raw/a.jsonl", fields={"messages": "convs"}, on_error="skip")
    assert [r["source"] for r in records] == ["raw/a.jsonl:1[0]", "raw/a.jsonl:1[2]"]
    assert stats["skipped"][0]["conversation"] == 1 and stats["skipped"][0]["line"] == 1


# ---- counted and located ----------------------------------------------------------------------------------------

def test_a_conversation_ending_on_a_user_turn_keeps_it_as_context_and_is_counted(capsys):
    write("raw/c.jsonl", jsonl({"messages": CHAT}, {"messages": CHAT + [{"role": "user", "content": "thanks"}]}))
    records, stats = run("raw/c.jsonl")
    assert len(records) == 2 and stats["suspicious"] == {"ends_on_user_turn": {"count": 1, "first": ["raw/c.jsonl:2"]}}
    last = records[1]["segments"]
    assert not last[-1]["response"] and "thanks" in last[-1]["text"] and last[:-1] == CHATML_SEGMENTS[:-1]
    assert "1 conversations ending on a user turn" in capsys.readouterr().err


def test_empty_text_documents_are_dropped_and_counted_not_called_empty_answers(capsys):
    write("raw/t.jsonl", jsonl({"text": "one"}, {"text": ""}, {"text": " \n "}, {"text": "two"}))
    records, stats = run("raw/t.jsonl")
    assert texts(records) == ["one", "two"] and stats["records_read"] == 4 and stats["records_skipped"] == 0
    assert stats["suspicious"] == {"empty_document": {"count": 2, "first": ["raw/t.jsonl:2", "raw/t.jsonl:3"]}}
    err = capsys.readouterr().err
    assert "2 empty documents" in err and "empty answers" not in err


@pytest.mark.parametrize("name, wrap", [("raw/deep.jsonl", lambda s: s),
                                        ("raw/deep.json", lambda s: f'[{{"text": "a"}}, {s}]')])
def test_100000_nested_brackets_are_a_bad_record_not_a_recursion_error(name, wrap):
    write(name, wrap("[" * 100_000 + "]" * 100_000) + "\n" + ('{"text": "after"}\n' if "jsonl" in name else ""))
    with pytest.raises(UserError, match="nested deeper than the JSON parser allows"):
        run(name)
    records, stats = run(name, on_error="skip")
    assert texts(records) == (["after"] if "jsonl" in name else ["a"]) and stats["records_skipped"] == 1
    assert "nested deeper" in stats["skipped"][0]["problem"]


@pytest.mark.parametrize("name, compress", [("raw/t.txt", bytes), ("raw/t.txt.gz", gzip.compress)])
def test_a_line_longer_than_max_record_mb_is_a_bad_record_and_reading_goes_on(name, compress):
    long_line = "x" * 5000
    write(name, compress(f"one\n\n{long_line}\n\ntwo\nthree\n".encode()))
    with pytest.raises(UserError, match=rf"{name}:3: a line longer than render\.max_record_mb = 0\.002 MB"):
        run(name, max_record_mb=0.002)  # 2,097 bytes
    records, stats = run(name, max_record_mb=0.002, on_error="skip")
    assert texts(records) == ["one", "two\nthree"] and [r["source"] for r in records] == [f"{name}:1", f"{name}:5"]
    assert stats["skipped"][0]["line"] == 3
    assert texts(run(name)[0]) == ["one", long_line, "two\nthree"]


def test_a_json_array_element_longer_than_max_record_mb_is_named():
    write("raw/a.json", json.dumps([{"text": "ok"}, {"text": "x" * 5000}]))
    records, stats = run("raw/a.json", max_record_mb=0.002, on_error="skip")
    assert texts(records) == ["ok"] and "an element longer than render.max_record_mb" in stats["skipped"][0]["problem"]


# ---- a file whose bytes contradict its name ---------------------------------------------------------------------

@pytest.mark.parametrize("name, content, looks, fix", [
    ("raw/a.jsonl.zst", b'{"text": "plain"}\n', "plain JSON", "rename it to a.jsonl"),
    ("raw/a.jsonl.gz", zstandard.ZstdCompressor().compress(b'{"text": "z"}\n'), "zstd data",
     "rename it to a.jsonl.zst"),
    ("raw/a.txt.gz", b"just text\n", "plain text", "rename it to a.txt"),
    ("raw/a.jsonl", gzip.compress(b'{"text": "g"}\n'), "gzip data", "rename it to a.jsonl.gz"),
    ("raw/a.txt", b"\xff\xfeh\x00i\x00", "UTF-16 text", r"convert it to UTF-8 text \(iconv"),
    ("raw/a.json.gz", b"", "an empty file", "it holds nothing; download it again, or delete it"),
    ("raw/a.txt.zst", bz2.compress(b"text\n"), "bzip2 data", "unpack it into .txt, .json, .jsonl or .parquet"),
    ("raw/a.jsonl.gz", bytes(range(256)), "binary data", "check what format it is in"),
])
def test_a_file_whose_bytes_contradict_its_name_says_what_it_looks_like_and_the_fix(name, content, looks, fix):
    write(name, content)
    with pytest.raises(UserError, match=rf"{name}: the name says .*, but the file looks like {looks}: {fix}"):
        run(name, on_error="skip")


def test_a_renamed_file_reads():
    write("raw/a.jsonl", b'{"text": "plain"}\n')
    assert texts(run("raw/a.jsonl")[0]) == ["plain"]


def test_latin1_text_is_named_with_the_fix():
    write("raw/t.txt", "ok\n\ncaf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"raw/t\.txt:3: bytes that are not UTF-8 at byte 4 of the line \(b'\\xe9 cr'\);"
                                        r" the text looks like Latin-1 \(Windows-1252\) at byte 4; convert the file "
                                        r"\(iconv -f latin1 -t utf-8\) or save the file as UTF-8"):
        run("raw/t.txt")


def test_params_records_field_and_max_record_mb_are_typed():
    render_params = parse_params({"render": {"records_field": "data", "max_record_mb": 1}}).render
    assert render_params.records_field == "data" and render_params.max_record_mb == 1
    with pytest.raises(UserError, match="max_record_mb"):
        parse_params({"render": {"max_record_mb": 0}})


def test_folder_output_is_the_same_with_one_worker_or_several():
    for i in range(4):
        write(f"raw/{i % 2}/part{i}.jsonl", jsonl(*[{"text": f"doc {i}.{j}"} for j in range(30)]))
    outputs = []
    for workers in (1, 2):
        render(parse_params({"render": {"data_path": "raw", "workers": workers}}), "out", piece_bytes=200)
        outputs.append(Path("out/records.jsonl").read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].count(b"\n") == 120
