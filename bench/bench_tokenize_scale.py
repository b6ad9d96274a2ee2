"""Benchmark of the tokenize stage's memory with many short documents: peak RSS against the size of the token arrays
it writes, which should be the only thing that grows with the number of documents (beyond the per-document index).

    python bench/bench_tokenize_scale.py TOKENIZER_FOLDER                   # 2, 5 and 20 million documents
    python bench/bench_tokenize_scale.py TOKENIZER_FOLDER --millions 2 --code OTHER_CHECKOUT

For each size it writes records.jsonl of that many short plain text documents (a sentence each, about 10 tokens)
in a temporary folder, then runs the tokenize stage (default params: 5% validation, shuffled, chunk_mb 4) in a fresh
subprocess and reports wall time, peak RSS, and the bytes of the token arrays it wrote (<split>.bin ids,
<split>.mask.bin, <split>.docs.bin). `--code` runs another checkout's tokenize stage on the same records, for a
before/after comparison. 20 million documents need about 2.5 GB of free disk in the temporary folder.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ANIMALS = ["cat", "dog", "heron", "otter", "lynx", "wren", "badger"]


def write_records(path: Path, documents: int) -> int:
    """records.jsonl of `documents` one-sentence plain text records; returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for first in range(0, documents, 100_000):
            f.write("".join(
                f'{{"source": "notes.txt:{i}", "kind": "text", "segments": [{{"text": "Note {i}: the '
                f'{ANIMALS[i % 7]} sat on mat {i % 1000}.", "response": true}}]}}\n'
                for i in range(first, min(first + 100_000, documents))))
    return path.stat().st_size


def run_stage(folder: Path, tokenizer: Path, code: Path) -> dict:
    """Child: the tokenize stage of the checkout `code` end to end."""
    sys.path.insert(0, str(code))
    from stages.lib.base.params import TokenizeParams
    from stages.tokenize import tokenize_records

    started = time.perf_counter()
    meta = tokenize_records(folder / "records.jsonl", tokenizer, folder / "tokens", TokenizeParams())
    seconds = time.perf_counter() - started
    splits = meta["splits"].values()
    arrays = sum(p.stat().st_size for p in (folder / "tokens").glob("*.bin"))
    return {"seconds": seconds, "tokens": sum(s["tokens"] for s in splits),
            "documents": sum(s["documents"] for s in splits), "token_array_bytes": arrays}


def measure(folder: Path, tokenizer: Path, code: Path) -> dict:
    """Run the stage in a fresh process; its timing, counts and peak RSS."""
    command = [sys.executable, __file__, str(tokenizer), "--child", str(folder), "--code", str(code)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=code)
    if done.returncode:
        sys.exit(f"tokenize run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Parse arguments; as parent write the records and report, as child run one measurement."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", type=Path, help="a tokenizer folder with tokenizer.json")
    parser.add_argument("--millions", type=float, nargs="+", default=[2, 5, 20], help="documents, in millions")
    parser.add_argument("--code", type=Path, nargs="+", default=[REPO], help="checkouts whose stage to run")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_stage(args.child, args.tokenizer.resolve(), args.code[0].resolve())
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    print(f"{'documents':>11} {'code':>10} {'seconds':>8} {'tokens':>13} {'token arrays':>13} {'peak RSS':>10} "
          f"{'RSS / arrays':>12}")
    rows = []
    for millions in args.millions:
        with tempfile.TemporaryDirectory(prefix="bench_tokenize_scale_") as tmp:
            folder = Path(tmp)
            write_records(folder / "records.jsonl", int(millions * 1e6))
            for code in args.code:
                r = measure(folder, args.tokenizer.resolve(), code.resolve())
                arrays_mb = r["token_array_bytes"] / (1 << 20)
                print(f"{r['documents']:11,} {code.name:>10} {r['seconds']:8.1f} {r['tokens']:13,} "
                      f"{arrays_mb:10.0f} MB {r['peak_rss_mb']:7.0f} MB {r['peak_rss_mb'] / arrays_mb:12.2f}",
                      flush=True)
                rows.append({"millions": millions, "code": str(code), **r})
    print("\n" + json.dumps(rows))


if __name__ == "__main__":
    main()
