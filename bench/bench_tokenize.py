"""Benchmark: the tokenize stage against the `tokenizers` library's own `encode_batch` on the same paragraphs.

    python bench/bench_tokenize.py TEXT_FILE TOKENIZER_FOLDER --mb 5 50

For each size it repeats TEXT_FILE into a corpus of that many MB in a temporary folder, cuts it into paragraphs
(blank lines), writes them as plain text records (data/rendered/records.jsonl, as the render stage would), then
times, each in a fresh subprocess so that peak memory does not mix:
- stage:   `tokenize_records` with the default tokenize params (5% validation, shuffled);
- library: `encode_batch` over the same paragraphs read in 4 MB blocks (the fastest way to use that library).
Runs alternate (stage, library, stage, ...) and the median of --repeats is shown, because other load on the
machine changes throughput from one minute to the next; CPU seconds (all threads) are shown as well, being less
sensitive to that load than wall time.
"""

import argparse
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


def build_corpus(text_file: Path, mb: float, folder: Path) -> int:
    """Write paragraphs.txt and rendered/records.jsonl of about `mb` MB of text; return the paragraph count."""
    paragraphs = [p.strip("\n") for p in text_file.read_text(encoding="utf-8").split("\n\n")]
    paragraphs = [p for p in paragraphs if p.strip()]
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


def run_stage(folder: Path, tokenizer: Path, chunk_mb: float) -> dict:
    """Child: the tokenize stage end to end."""
    sys.path.insert(0, str(REPO))
    from stages.lib.params import TokenizeParams
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


def measure(kind: str, folder: Path, tokenizer: Path, chunk_mb: float) -> dict:
    """Run one child process and return its timing, token count and peak RSS."""
    command = [sys.executable, __file__, "--child", kind, str(folder), str(tokenizer), "--chunk-mb", str(chunk_mb)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        sys.exit(f"{kind} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(mb: float, nbytes: int, runs: dict) -> None:
    """Print medians for the stage and the library, and the stage's share of the library's throughput."""
    rows = {}
    for kind, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        cpu = statistics.median(r["cpu_seconds"] for r in results)
        rows[kind] = (nbytes / 1e6 / seconds, results[0]["tokens"] / seconds,
                      max(r["peak_rss_mb"] for r in results), results[0]["tokens"], results[0]["documents"], cpu)
    print(f"\n{mb:g} MB corpus ({nbytes / 1e6:.1f} MB of text, {rows['stage'][4]:,} paragraphs)")
    print(f"{'':8} {'MB/s':>7} {'tokens/s':>11} {'peak RSS':>10} {'tokens':>12} {'CPU s':>7}")
    for kind, (mbs, tps, rss, tokens, _, cpu) in rows.items():
        print(f"{kind:8} {mbs:7.2f} {tps:11,.0f} {rss:8.0f} MB {tokens:12,} {cpu:7.1f}")
    print(f"stage / library throughput: {rows['stage'][0] / rows['library'][0]:.2f}x "
          f"(stage tokens = library tokens + one EOS per paragraph: "
          f"{rows['stage'][3] == rows['library'][3] + rows['library'][4]})")


def main() -> None:
    """Parse arguments; as parent build corpora and compare, as child run one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("text_file", type=Path)
    parser.add_argument("tokenizer", type=Path, help="a tokenizer folder with tokenizer.json")
    parser.add_argument("--mb", type=float, nargs="+", default=[5.0, 50.0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--chunk-mb", type=float, default=4.0)
    parser.add_argument("--child", choices=["stage", "library"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        # Here text_file is the corpus folder the parent built.
        if args.child == "stage":
            result = run_stage(args.text_file, args.tokenizer.resolve(), args.chunk_mb)
        else:
            result = run_library(args.text_file, args.tokenizer.resolve())
        usage = resource.getrusage(resource.RUSAGE_SELF)
        result["peak_rss_mb"] = usage.ru_maxrss / 1024
        result["cpu_seconds"] = usage.ru_utime + usage.ru_stime  # whole process, every thread
        print(json.dumps(result))
        return
    for mb in args.mb:
        with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as tmp:
            folder = Path(tmp)
            build_corpus(args.text_file, mb, folder)
            nbytes = (folder / "paragraphs.txt").stat().st_size
            runs = {"stage": [], "library": []}
            for _ in range(args.repeats):
                for kind in runs:
                    runs[kind].append(measure(kind, folder, args.tokenizer.resolve(), args.chunk_mb))
            report(mb, nbytes, runs)


if __name__ == "__main__":
    main()
