"""Benchmark of the render stage on compressed text with no paragraph breaks: time must grow linearly with the size
and peak memory must stay flat (a piece, plus one document), however long the file.

    python bench/bench_render.py                      # 64, 128 and 256 MB
    python bench/bench_render.py --mb 16 32 --workers 2
    python bench/bench_render.py --repo ../other-checkout   # the same, rendered by another checkout's code

For each size it writes a `.txt.gz` of that many MB of text (single-newline lines, so under `text_split: paragraph`
the whole file is one paragraph with no place to cut but line ends) into a temporary folder, then renders it in a
fresh subprocess (so that peak memory does not mix) and reports the wall time, the peak RSS of that process (and of
its worker processes, with --workers above 1) and the time relative to the first size. Other load on the machine
changes wall time from one minute to the next: compare sizes from the same run.
"""

import argparse
import gzip
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the", "model", "reads", "a", "line", "of", "text", "and", "every", "word", "counts", "once", "more", "data")

RENDER = """
import sys
from stages.lib.base.params import parse_params
from stages.render import render
render(parse_params({"render": {"data_path": sys.argv[1], "workers": int(sys.argv[2]), "text_split": "paragraph"}}),
       sys.argv[3])
"""


def write_text_gz(path: Path, mb: int) -> int:
    """A gzip file of `mb` MB of single-newline lines; the number of lines."""
    rng, target, written, lines = random.Random(0), mb << 20, 0, 0
    block = "".join(" ".join(rng.choices(WORDS, k=12)) + f" {i}\n" for i in range(20_000)).encode()
    with gzip.open(path, "wb", compresslevel=1) as out:
        while written < target:
            part = block[:target - written]
            out.write(part)
            written += len(part)
            lines += part.count(b"\n")
    return lines


def render_once(data: Path, out: Path, workers: int, repo: Path) -> tuple[float, float, dict]:
    """(seconds, peak RSS in MB of the render process and its workers, stats) of one render in a subprocess."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", RENDER, str(data), str(workers), str(out)], cwd=repo, check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far (KB on Linux)
    return seconds, peak, json.loads((out / "stats.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repo", type=Path, default=REPO, help="the checkout whose render stage runs")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-render-") as tmp:
        for mb in sorted(args.mb):  # ascending: RUSAGE_CHILDREN's peak is then this size's own
            data, out = Path(tmp, f"text-{mb}.txt.gz"), Path(tmp, "out")
            lines = write_text_gz(data, mb)
            seconds, peak, stats = render_once(data, out, args.workers, args.repo.resolve())
            size = (out / "records.jsonl").stat().st_size
            rows.append((mb, seconds, peak, stats["records_written"], lines))
            print(f"{mb:5d} MB ({data.stat().st_size / 1e6:.0f} MB gzip, {lines:,} lines): {seconds:7.2f} s, "
                  f"peak RSS {peak:7.0f} MB, {stats['records_written']} records, records.jsonl {size / 1e6:.0f} MB",
                  flush=True)
            data.unlink()
            (out / "records.jsonl").unlink()
    first_mb, first_seconds = rows[0][0], rows[0][1]
    for mb, seconds, peak, _, _ in rows[1:]:
        print(f"{mb} MB / {first_mb} MB: {mb / first_mb:.0f}x the data, {seconds / first_seconds:.2f}x the time, "
              f"{peak / rows[0][2]:.2f}x the peak RSS")


if __name__ == "__main__":
    main()
