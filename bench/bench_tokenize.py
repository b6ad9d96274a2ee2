"""Benchmark of the data stages: tokenize against the `tokenizers` library's own `encode_batch` on the same
paragraphs, and render with one process against render with several.

    python bench/bench_tokenize.py TEXT_FILE TOKENIZER_FOLDER                      # 5 MB, 50 MB, 1 GB; render 500 MB
    python bench/bench_tokenize.py TEXT_FILE TOKENIZER_FOLDER --mb 5 50 --render-mb 50 --repeats 3

Tokenize: for each size it repeats TEXT_FILE into a corpus of that many MB in a temporary folder, cuts it into
paragraphs (blank lines), writes them as plain text records (data/rendered/records.jsonl, as the render stage
would), then times, each in a fresh subprocess so that peak memory does not mix:
- stage:   `tokenize_records` with the default tokenize params (5% validation, shuffled; a byte-level BPE is encoded
           with tiktoken, which gives the same ids);
- library: `encode_batch` over the same paragraphs read in 4 MB blocks (the fastest way to use that library).

Render: it writes instruction records (JSONL: a paragraph's first line as the instruction, the rest as the output)
of --render-mb MB and renders them with render.workers 1 and 2 (and more with --workers), checking that the
outputs are byte-identical.

Runs alternate (stage, library, stage, ...; 1 process, 2 processes, ...) and the median of --repeats is shown,
because other load on the machine changes throughput from one minute to the next; CPU seconds (all threads and
worker processes) are shown as well, being less sensitive to that load than wall time. The full default run takes
about half an hour on 2 cores and needs about 4 GB of free disk in the temporary folder.
"""

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = 4 << 20  # bytes of text per encode_batch call in the library run


def paragraphs_of(text_file: Path) -> list[str]:
    paragraphs = [p.strip("\n") for p in text_file.read_text(encoding="utf-8").split("\n\n")]
    return [p for p in paragraphs if p.strip()]


def build_corpus(text_file: Path, mb: float, folder: Path) -> int:
    """Write paragraphs.txt and rendered/records.jsonl of about `mb` MB of text; return the paragraph count."""
    paragraphs = paragraphs_of(text_file)
    target, written, count = mb * 1e6, 0, 0
    (folder / "rendered").mkdir(parents=True)
    with open(folder / "paragraphs.txt", "w", encoding="utf-8") as plain, \
            open(folder / "rendered" / "records.jsonl", "w", encoding="utf-8") as records:
        while written < target:
            for paragraph in paragraphs:
                plain.write(paragraph + "\n\n")
                records.write(json.dumps({"source": f"{text_file.name}:{count}", "kind": "text",
                                          "segments": [{"text": paragraph, "response": True}]}) + "\n")
                written += len(paragraph.encode("utf-8")) + 2
                count += 1
                if written >= target:
                    break
    return count


def build_instructions(text_file: Path, mb: float, folder: Path) -> Path:
    """Write raw/instructions.jsonl of about `mb` MB: Alpaca-style records made from the paragraphs."""
    records = [json.dumps({"instruction": p.split("\n", 1)[0], "input": "",
                           "output": p.split("\n", 1)[1] if "\n" in p else p}) + "\n" for p in paragraphs_of(text_file)]
    path = folder / "raw" / "instructions.jsonl"
    path.parent.mkdir(parents=True)
    block = "".join(records).encode("utf-8")
    with open(path, "wb") as f:
        for _ in range(max(1, round(mb * 1e6 / len(block)))):
            f.write(block)
    return path


def run_stage(folder: Path, tokenizer: Path, chunk_mb: float) -> dict:
    """Child: the tokenize stage end to end."""
    sys.path.insert(0, str(REPO))
    from stages.lib.base.params import TokenizeParams
    from stages.tokenize import tokenize_records

    started = time.perf_counter()
    meta = tokenize_records(folder / "rendered" / "records.jsonl", tokenizer, folder / "tokens",
                            TokenizeParams(chunk_mb=chunk_mb))
    seconds = time.perf_counter() - started
    splits = meta["splits"].values()
    return {"seconds": seconds, "tokens": sum(s["tokens"] for s in splits),
            "documents": sum(s["documents"] for s in splits)}


def run_library(folder: Path, tokenizer: Path) -> dict:
    """Child: the library alone, `encode_batch` over the paragraphs, 4 MB of text at a time."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer / "tokenizer.json"))
    started = time.perf_counter()
    tokens = documents = 0
    with open(folder / "paragraphs.txt", encoding="utf-8") as f:
        rest = ""
        while block := f.read(BLOCK):
            block, _, rest = (rest + block).rpartition("\n\n")  # cut at a paragraph's end
            paragraphs = block.split("\n\n")
            tokens += sum(len(e) for e in backend.encode_batch(paragraphs, add_special_tokens=False))
            documents += len(paragraphs)
        if rest.strip("\n"):
            tokens += len(backend.encode(rest.strip("\n"), add_special_tokens=False))
            documents += 1
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "documents": documents}


def run_render(folder: Path, workers: int) -> dict:
    """Child: the render stage on raw/ with `workers` processes."""
    sys.path.insert(0, str(REPO))
    from stages.lib.base.params import parse_params
    from stages.render import render

    out = folder / f"rendered-{workers}"
    started = time.perf_counter()
    stats = render(parse_params({"render": {"data_path": str(folder / "raw"), "workers": workers}}), out)
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()  # a block at a time: reading the output whole would be the peak of memory
    with open(out / "records.jsonl", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    (out / "records.jsonl").unlink()  # the next run writes its own
    return {"seconds": seconds, "records": stats["records_written"], "sha256": digest.hexdigest()}


def measure(kind: str, folder: Path, tokenizer: Path, chunk_mb: float, workers: int = 1) -> dict:
    """Run one child process and return its timing, counts and peak RSS."""
    command = [sys.executable, __file__, "--child", kind, str(folder), str(tokenizer), "--chunk-mb", str(chunk_mb),
               "--workers", str(workers)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"{kind} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(mb: float, nbytes: int, runs: dict) -> dict:
    """Print medians for the stage and the library, and the stage's share of the library's throughput."""
    rows = {}
    for kind, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        cpu = statistics.median(r["cpu_seconds"] for r in results)
        rows[kind] = (nbytes / 1e6 / seconds, results[0]["tokens"] / seconds,
                      max(r["peak_rss_mb"] for r in results), results[0]["tokens"], results[0]["documents"], cpu)
    print(f"\ntokenize, {mb:g} MB corpus ({nbytes / 1e6:.1f} MB of text, {rows['stage'][4]:,} paragraphs)")
    print(f"{'':8} {'MB/s':>7} {'tokens/s':>11} {'peak RSS':>10} {'tokens':>12} {'CPU s':>7}")
    for kind, (mbs, tps, rss, tokens, _, cpu) in rows.items():
        print(f"{kind:8} {mbs:7.2f} {tps:11,.0f} {rss:8.0f} MB {tokens:12,} {cpu:7.1f}")
    ratio = rows["stage"][0] / rows["library"][0]
    print(f"stage / library throughput: {ratio:.2f}x (stage tokens = library tokens + one EOS per paragraph: "
          f"{rows['stage'][3] == rows['library'][3] + rows['library'][4]})")
    return {"mb": mb, "ratio": ratio, "stage_mb_s": rows["stage"][0], "library_mb_s": rows["library"][0],
            "stage_peak_rss_mb": rows["stage"][2], "library_peak_rss_mb": rows["library"][2]}


def report_render(mb: float, nbytes: int, runs: dict) -> dict:
    """Print render MB/s per number of processes, the speed-up over one, and whether the outputs are identical."""
    print(f"\nrender, {mb:g} MB of instruction JSONL ({nbytes / 1e6:.1f} MB, {runs[1][0]['records']:,} records)")
    print(f"{'processes':>9} {'MB/s':>7} {'peak RSS':>10} {'CPU s':>7}")
    rates = {}
    for workers, results in runs.items():
        rates[workers] = nbytes / 1e6 / statistics.median(r["seconds"] for r in results)
        print(f"{workers:9} {rates[workers]:7.2f} {max(r['peak_rss_mb'] for r in results):8.0f} MB "
              f"{statistics.median(r['cpu_seconds'] for r in results):7.1f}")
    same = len({r["sha256"] for results in runs.values() for r in results}) == 1
    print("speed-up over 1 process: " + ", ".join(f"{w} processes {rates[w] / rates[1]:.2f}x" for w in rates if w > 1)
          + f"; records.jsonl byte-identical: {same}")
    return {"mb": mb, "mb_s": rates, "identical": same}


def child(args) -> None:
    """As a child process: one measurement, printed as a JSON line (text_file is then the corpus folder)."""
    if args.child == "stage":
        result = run_stage(args.text_file, args.tokenizer.resolve(), args.chunk_mb)
    elif args.child == "library":
        result = run_library(args.text_file, args.tokenizer.resolve())
    else:
        result = run_render(args.text_file, args.workers)
    usage, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["peak_rss_mb"] = max(usage.ru_maxrss, workers.ru_maxrss) / 1024  # the largest single process
    result["cpu_seconds"] = sum(u.ru_utime + u.ru_stime for u in (usage, workers))  # every thread and process
    print(json.dumps(result))


def main() -> None:
    """Parse arguments; as parent build corpora and compare, as child run one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text_file", type=Path)
    parser.add_argument("tokenizer", type=Path, help="a tokenizer folder with tokenizer.json")
    parser.add_argument("--mb", type=float, nargs="*", default=[5.0, 50.0, 1000.0], help="tokenize corpus sizes")
    parser.add_argument("--render-mb", type=float, default=500.0, help="render corpus size; 0 skips render")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="render processes to compare")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--child", choices=["stage", "library", "render"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.workers = args.workers[0]
        return child(args)
    summary = {"tokenize": [], "render": None}
    for mb in args.mb:
        with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
            folder = Path(tmp)
            build_corpus(args.text_file, mb, folder)
            nbytes = (folder / "paragraphs.txt").stat().st_size
            runs = {"stage": [], "library": []}
            for _ in range(args.repeats):
                for kind in runs:
                    runs[kind].append(measure(kind, folder, args.tokenizer.resolve(), args.chunk_mb))
            summary["tokenize"].append(report(mb, nbytes, runs))
    if args.render_mb:
        with tempfile.TemporaryDirectory(prefix="bench_render_") as tmp:
            folder = Path(tmp)
            nbytes = build_instructions(args.text_file, args.render_mb, folder).stat().st_size
            runs = {workers: [] for workers in sorted(set([1] + args.workers))}
            for _ in range(args.repeats):
                for workers in runs:
                    runs[workers].append(measure("render", folder, args.tokenizer, args.chunk_mb, workers))
            summary["render"] = report_render(args.render_mb, nbytes, runs)
    print("\n" + json.dumps(summary))


if __name__ == "__main__":
    main()
