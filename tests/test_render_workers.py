"""Render stage at scale: a worker process that dies fails the stage at once, naming the piece; pieces are cut in one
pass with bounded size, even where no paragraph ends."""

import gzip
import json
import os
import signal
import time
from pathlib import Path

import pytest
from test_render import in_tmp, run, texts, write  # noqa: F401

import stages.render
from stages.lib.base.errors import UserError
from stages.lib.base.params import parse_params
from stages.lib.base.workers import WorkerDied, ordered_map
from stages.lib.ingest.pieces import expanded, file_layout, plan_file
from stages.render import render

REAL_RENDER_PIECE = stages.render.render_piece


def _nothing_to_set_up() -> None:
    pass


def _square_or_die_on_three(item: int) -> int:
    if item == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
    return item * item


def _render_piece_or_die_on_piece_two(task):
    if task[0] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return REAL_RENDER_PIECE(task)


def test_ordered_map_names_the_item_of_a_worker_that_was_killed():
    started, seen = time.monotonic(), []
    with pytest.raises(WorkerDied) as died:
        for result in ordered_map(_square_or_die_on_three, range(40), 2, _nothing_to_set_up):
            seen.append(result)
    assert died.value.item == 3 and died.value.how() == "was killed by SIGKILL"
    # results finished but not yet collected when the pool broke are lost with it
    assert seen == [0, 1, 4][:len(seen)] and time.monotonic() - started < 30
    assert list(ordered_map(_square_or_die_on_three, [5, 6, 7], 2, _nothing_to_set_up)) == [25, 36, 49]


def test_a_killed_render_worker_fails_the_stage_naming_the_piece_and_writes_nothing(monkeypatch):
    write("raw/t.txt", "".join(f"paragraph {i}\nsecond line\n\n" for i in range(200)))
    monkeypatch.setattr(stages.render, "render_piece", _render_piece_or_die_on_piece_two)
    params = parse_params({"render": {"data_path": "raw", "workers": 2}})
    with pytest.raises(UserError, match=r"a render worker process was killed by SIGKILL while rendering piece 2 "
                                        r"\(raw/t\.txt, from line \d+\); the usual cause is memory .*"
                                        r"render\.workers: 1"):
        render(params, "out", piece_bytes=1000)
    assert not Path("out/records.jsonl").exists() and [p.name for p in Path("out").iterdir()] == []
    monkeypatch.setattr(stages.render, "render_piece", REAL_RENDER_PIECE)
    render(params, "out", piece_bytes=1000)
    assert Path("out/records.jsonl").read_text().count("\n") == 200


# ---- cutting into pieces ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, compress", [("raw/t.txt", bytes), ("raw/t.txt.gz", gzip.compress)])
def test_a_paragraph_with_no_end_is_cut_at_a_line_end_within_twice_the_piece_size(name, compress):
    lines = "".join(f"line {i:05d} of one long paragraph\n" for i in range(3000))  # single newlines only
    write(name, compress(lines.encode()))
    path = Path(name)
    planned = plan_file(path, 0, file_layout(path, False, ()), "text", "paragraph", piece_bytes=4000)
    pieces = list(expanded(planned, "paragraph", piece_bytes=4000))
    if pieces[0].data is None:  # an uncompressed file: byte ranges
        sizes = [p.size for p in pieces]
        joined = b"".join(path.read_bytes()[p.start:p.start + p.size] for p in pieces)
    else:
        sizes = [len(p.data) for p in pieces]
        joined = b"".join(p.data for p in pieces)
    assert len(pieces) > 10 and max(sizes) <= 2 * 4000 and joined == lines.encode()
    assert all(joined[:sum(sizes[:i])].endswith(b"\n") for i in range(1, len(sizes)))
    records = render(parse_params({"render": {"data_path": name, "workers": 1}}), "out", piece_bytes=4000)
    assert records["records_written"] == len(pieces)
    out = [json.loads(line) for line in Path("out/records.jsonl").read_text().splitlines()]
    second = 1 + joined[:sizes[0]].count(b"\n")  # the line the second piece starts on
    assert "\n".join(texts(out)) + "\n" == lines and out[1]["source"] == f"{name}:{second}"


def test_a_line_with_no_end_longer_than_max_record_mb_is_never_held_whole():
    write("raw/t.txt.gz", gzip.compress(b"first\n\n" + b"y" * 3_000_000 + b"\n\nlast\n"))
    pieces = list(expanded(plan_file(Path("raw/t.txt.gz"), 0, "text", "text", "paragraph"), "paragraph",
                           piece_bytes=4000, max_line=1 << 20))
    assert max(len(p.data) for p in pieces) < 2 << 20 and [p.long_line for p in pieces if p.long_line] == [3]
    records, stats = run("raw/t.txt.gz", on_error="skip", max_record_mb=1)
    assert texts(records) == ["first", "last"] and stats["skipped"][0]["line"] == 3

