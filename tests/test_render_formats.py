"""Render stage readers: Parquet, gzip and zstd, streamed JSON arrays, bare-list JSONL lines, line numbers that
point at the bad byte, and the same output with one worker process or several."""

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import unmarked
from test_render import ALPACA_NO_INPUT, CHAT, CHATML_SEGMENTS, in_tmp, jsonl, run, texts, write  # noqa: F401

from stages.lib.base.errors import UserError
from stages.lib.base.params import parse_params
from stages.lib.ingest import readers
from stages.render import render

INSTRUCTIONS = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(5)]


def write_parquet(path: str, rows: list[dict], row_group_size: int = 2) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return path


# ---- Parquet ----------------------------------------------------------------------------------------------------

def test_parquet_text_column_is_plain_text_and_other_columns_are_counted_as_dropped():
    write_parquet("raw/t.parquet", [{"text": f"document {i}", "url": f"http://x/{i}", "score": 0.5} for i in range(5)])
    records, stats = run("raw/t.parquet")
    assert texts(records) == [f"document {i}" for i in range(5)]
    assert [r["source"] for r in records] == [f"raw/t.parquet[{i}]" for i in range(5)]
    assert all(r["kind"] == "text" and r["segments"][0]["response"] for r in records)
    assert stats["formats"] == {"raw/t.parquet": "text"}
    assert stats["fields_dropped"]["url"] == {"count": 5, "first": [f"raw/t.parquet[{i}]" for i in range(5)]}
    assert stats["fields_dropped"]["score"]["count"] == 5


def test_parquet_instruction_columns_render_like_jsonl():
    write_parquet("raw/i.parquet", INSTRUCTIONS)
    write("jsonl/i.jsonl", jsonl(*INSTRUCTIONS))
    from_parquet, stats = run("raw/i.parquet")
    from_jsonl, _ = run("jsonl/i.jsonl")
    assert [r["segments"] for r in from_parquet] == [r["segments"] for r in from_jsonl]
    assert from_parquet[0]["segments"][0]["text"] == ALPACA_NO_INPUT.replace("Say hi.", "Say 0.")
    assert stats["formats"] == {"raw/i.parquet": "instruction"}


def test_parquet_messages_column_renders_as_chat():
    write_parquet("raw/c.parquet", [{"messages": CHAT, "id": 1}, {"messages": CHAT[1:3], "id": 2}])
    records, stats = run("raw/c.parquet")
    assert unmarked(records[0]["segments"]) == CHATML_SEGMENTS and records[0]["kind"] == "chat"
    assert stats["formats"] == {"raw/c.parquet": "chat"} and stats["fields_dropped"]["id"]["count"] == 2


def test_parquet_errors_name_the_row():
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None},
            {"instruction": "d", "output": "e"}]
    write_parquet("raw/i.parquet", rows)
    with pytest.raises(UserError, match=r"raw/i\.parquet\[1\] \(row 1 of the Parquet file, counting from 0\): "
                                        r"missing field 'output'"):
        run("raw/i.parquet")
    records, stats = run("raw/i.parquet", on_error="skip")
    assert len(records) == 2 and stats["skipped"][0]["row"] == 1
    write_parquet("raw/x.parquet", [{"question": "q", "answer": "a"}])
    with pytest.raises(UserError, match=r"raw/x\.parquet: a record that is neither.*'question', 'answer'.*"
                                        r"render\.fields"):
        run("raw/x.parquet")
    write("bad/not.parquet", "not parquet at all")
    with pytest.raises(UserError, match=r"bad/not\.parquet is not a readable Parquet file"):
        run("bad/not.parquet")


# ---- compressed files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress),
                                              (".zst", lambda b: zstandard.ZstdCompressor().compress(b))])
def test_compressed_jsonl_json_and_text_read_like_the_plain_files(suffix, compress):
    plain = {"i.jsonl": jsonl(*INSTRUCTIONS), "a.json": json.dumps(INSTRUCTIONS, indent=1),
             "t.txt": "one\n\ntwo\nlines\n"}
    for name, content in plain.items():
        write(f"plain/{name}", content)
        write(f"packed/{name}{suffix}", compress(content.encode()))
    expected, _ = run("plain")
    got, stats = run("packed")
    assert [r["segments"] for r in got] == [r["segments"] for r in expected]
    assert [r["source"] for r in got] == [re.sub(r"^plain/([^:\[]+)", rf"packed/\g<1>{suffix}", r["source"])
                                          for r in expected]
    assert stats["formats"] == {f"packed/a.json{suffix}": "instruction", f"packed/i.jsonl{suffix}": "instruction",
                                f"packed/t.txt{suffix}": "text"}


def test_a_cut_off_gzip_file_keeps_what_came_before_and_counts_the_damage():
    data = gzip.compress(jsonl(*INSTRUCTIONS * 200).encode())
    write("raw/i.jsonl.gz", data[:len(data) // 2])
    records, stats = run("raw/i.jsonl.gz", on_error="skip")
    assert 0 < len(records) < 1000 and stats["records_skipped"] == 2
    half_line, damage = stats["skipped"]
    assert half_line["line"] == len(records) + 1 and "malformed JSON" in half_line["problem"]
    assert "gzip data is damaged or cut off" in damage["problem"] and damage["line"] is None


def test_a_compressed_file_is_cut_into_pieces_as_it_is_read():
    from stages.lib.ingest.pieces import expanded, file_layout, plan_file

    lines = jsonl(*INSTRUCTIONS * 300)
    write("raw/i.jsonl.zst", zstandard.ZstdCompressor().compress(lines.encode()))
    text = "".join(f"paragraph {i}\nline two\n\n" for i in range(3000))
    write("raw/t.txt.gz", gzip.compress(text.encode()))
    for name, layout, expected in (("raw/i.jsonl.zst", "jsonl", lines), ("raw/t.txt.gz", "text", text)):
        planned = plan_file(Path(name), 0, file_layout(Path(name), False, ("role",)), "text", "paragraph")
        pieces = list(expanded(planned, "paragraph", piece_bytes=2000))
        assert len(pieces) > 10 and b"".join(p.data for p in pieces).decode() == expected
        assert all(p.data.endswith(b"\n") for p in pieces)
        if layout == "text":  # cut where a blank line starts, so no paragraph is split
            assert all(p.data.startswith(b"\n") for p in pieces[1:])
        assert [p.first_line for p in pieces] == [1 + b"".join(q.data for q in pieces[:i]).count(b"\n")
                                                  for i in range(len(pieces))]
    one, _ = run("raw", workers=1)
    Path("out/records.jsonl").rename("one.jsonl")
    render(parse_params({"render": {"data_path": "raw", "workers": 2}}), "out", piece_bytes=2000)
    assert Path("out/records.jsonl").read_bytes() == Path("one.jsonl").read_bytes() and len(one) == 1500 + 3000


def test_multi_frame_zstd_is_read_whole():
    frames = b"".join(zstandard.ZstdCompressor().compress(jsonl(record).encode()) for record in INSTRUCTIONS)
    write("raw/i.jsonl.zst", frames)
    records, _ = run("raw/i.jsonl.zst")
    assert len(records) == len(INSTRUCTIONS)


# ---- JSON arrays and bare lists ---------------------------------------------------------------------------------

def test_a_json_array_is_streamed_element_by_element_across_read_chunks(monkeypatch):
    monkeypatch.setattr(readers, "_CHUNK", 64)  # elements straddle many chunk boundaries
    elements = [{"instruction": f"Repeat {'word ' * (i % 7)}{i}", "input": "", "output": "é" * i, "n": [1.5, None]}
                for i in range(40)]
    text = json.dumps(elements, indent=2, ensure_ascii=False)
    write("raw/a.json", text)
    records, stats = run("raw/a.json")
    assert [r["segments"][-1]["text"] for r in records] == [e["output"] for e in elements]
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line == "  {"]
    assert stats["fields_dropped"]["n"]["first"] == [f"raw/a.json[{i}]" for i in range(5)]
    write("raw/a.json", text.replace('"output": "ééé"', '"output": ééé'))
    with pytest.raises(UserError, match=rf"raw/a\.json\[3\] .*starting at line {starts[3]}\): the JSON array does not "
                                        rf"parse \(Expecting value, line {starts[3] + 3}\)"):
        run("raw/a.json")


def test_json_array_ends_and_extra_data_are_errors():
    write("raw/a.json", '[{"instruction": "x", "output": "y"} {"instruction": "x", "output": "y"}]')
    with pytest.raises(UserError, match=r"expected ',' or ']' after element 0 of the JSON array, found '\{'"):
        run("raw/a.json")
    write("raw/a.json", '[{"instruction": "x", "output": "y"}]\n[1]\n')
    with pytest.raises(UserError, match="more after the JSON array's closing"):
        run("raw/a.json")
    write("raw/a.json", "[]")
    with pytest.raises(UserError, match="no records were rendered"):
        run("raw/a.json")


def test_jsonl_lines_that_are_bare_lists_of_messages_are_conversations_each_counted():
    lines = []
    for i in range(128):
        conversation = [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": str(i)}]
        if i % 10 == 3:
            conversation[1]["role"] = "narrator"  # 13 bad conversations
        lines.append(json.dumps(conversation))
    write("raw/c.jsonl", "\n".join(lines) + "\n")
    records, stats = run("raw/c.jsonl", on_error="skip")
    assert stats["records_read"] == 128 and stats["records_skipped"] == 13 and len(records) == 115
    assert [s["line"] for s in stats["skipped"]] == [i + 1 for i in range(128) if i % 10 == 3]
    assert unmarked(records[0]["segments"])[1] == {"text": "0<|im_end|>", "response": True}
    assert stats["formats"] == {"raw/c.jsonl": "chat"}


def test_a_one_line_json_array_of_records_is_still_an_array():
    write("raw/a.jsonl", json.dumps(INSTRUCTIONS))
    records, _ = run("raw/a.jsonl")
    assert [r["source"] for r in records] == [f"raw/a.jsonl[{i}]" for i in range(5)]


# ---- line numbers -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["paragraph", "file", "line"])
def test_a_non_utf8_byte_is_named_by_its_own_line_in_every_text_mode(split):
    lines = [f"line {i} of a long paragraph".encode() for i in range(1, 40)]
    lines[31] = b"line 32 has a bad byte \xff here"
    write("raw/a.txt", b"\n".join(lines) + b"\n")
    with pytest.raises(UserError, match=r"raw/a\.txt:32: bytes that are not UTF-8 at byte 24 of the line"):
        run("raw/a.txt", text_split=split)


def test_a_non_utf8_byte_in_a_json_array_names_its_line_and_element():
    body = json.dumps(INSTRUCTIONS, indent=1).encode().replace(b'"Say 3."', b'"Say \xff3."')
    write("raw/a.json", body)
    line = body[:body.index(b"\xff")].count(b"\n") + 1
    with pytest.raises(UserError, match=rf"raw/a\.json\[3\] .*: bytes that are not UTF-8 at line {line}"):
        run("raw/a.json")
    records, stats = run("raw/a.json", on_error="skip")
    assert len(records) == 4 and stats["skipped"][0]["record"] == 3


# ---- pieces and worker processes --------------------------------------------------------------------------------

def test_pieces_and_workers_do_not_change_the_output():
    paragraphs = "".join(f"Paragraph {i}\nwith two lines.\n\n  \n" for i in range(300))
    write("raw/a.txt", (paragraphs + "caf\u00e9 is fine\n\n").encode() + b"bad \xff byte\n\nlast\n")
    write("raw/b.jsonl", jsonl(*INSTRUCTIONS * 60, {"messages": CHAT}) + "oops\n" + jsonl(*INSTRUCTIONS))
    write("raw/c.json", json.dumps(INSTRUCTIONS * 10))
    write_parquet("raw/d.parquet", [{"text": f"row {i}", "extra": i} for i in range(50)], row_group_size=7)
    results = []
    for piece_bytes, workers in ((1 << 30, 1), (300, 1), (300, 2), (1000, 3)):
        render(parse_params({"render": {"data_path": "raw", "on_error": "skip", "workers": workers}}), "out",
               piece_bytes=piece_bytes)
        results.append({name: Path("out", name).read_bytes() for name in ("records.jsonl", "stats.json")})
    assert all(result == results[0] for result in results[1:])
    stats = json.loads(results[0]["stats.json"])
    # The bad byte, the chat record in an instruction file, and "oops", each at its own line.
    assert [(s["file"], s["line"]) for s in stats["skipped"]] == [("raw/a.txt", 1203), ("raw/b.jsonl", 301),
                                                                   ("raw/b.jsonl", 302)]
    sources = [json.loads(line)["source"] for line in results[0]["records.jsonl"].splitlines()]
    assert sources[:2] == ["raw/a.txt:1", "raw/a.txt:5"] and sources[300:302] == ["raw/a.txt:1201", "raw/a.txt:1205"]
    assert sources[-1] == "raw/d.parquet[49]" and stats["records_written"] == 300 + 2 + 305 + 50 + 50


def test_workers_render_with_the_tokenizers_chat_template_as_one_process_does():
    from test_render import END_WITH_EOS_TEMPLATE, hf, make_hf_tokenizer

    make_hf_tokenizer("tok", END_WITH_EOS_TEMPLATE)
    write("raw/c.jsonl", jsonl(*[{"messages": CHAT}] * 40))
    outputs = []
    for workers in (1, 2):
        params = parse_params({"render": {"data_path": "raw", "workers": workers},
                               "tokenizer": hf("tok")})
        render(params, "out", piece_bytes=2000)
        outputs.append(Path("out/records.jsonl").read_bytes())
    assert outputs[0] == outputs[1] and json.loads(outputs[0].splitlines()[0])["segments"][1]["text"] == "5<|end|>\n"
    assert not [p for p in Path("out").iterdir() if p.name.startswith(".")]  # no part files left behind
