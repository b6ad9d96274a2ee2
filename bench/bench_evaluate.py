"""Peak memory and time of the evaluate stage's validation loss: through the chunked loss head (what the stage does)
against the model's full logits (what it did before), with the GPT-2 vocabulary and a context of 1,024.

    python bench/bench_evaluate.py                  # 2 batches of 8 x 1,024 tokens, fresh process per way
    python bench/bench_evaluate.py --batch-size 4 --seq-len 512

Each way runs in a fresh process (so one's peak cannot hide the other's) on the same random model (4 layers, 256
wide, a Llama as the train stage builds it) and the same random validation tokens; the peak resident memory of the
process is read from the kernel (ru_maxrss) after the model and data are in memory and after the loss. The full-logits
way holds batch x seq_len x vocabulary fp32 logits plus cross-entropy's own buffer of that size.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.evaluate import validation_loss  # noqa: E402
from stages.lib.base.params import ModelParams  # noqa: E402
from stages.lib.modeling.families import new_model  # noqa: E402
from stages.lib.tokenizing.batches import StreamWindows  # noqa: E402

VOCAB = 50257


def full_logits_loss(model, windows: StreamWindows, batch_size: int) -> float:
    """The validation loss as the stage computed it before: the model's whole logits, then cross-entropy."""
    total, counted = 0.0, 0
    for at in range(0, windows.count, batch_size):
        chosen = np.arange(at, min(at + batch_size, windows.count))
        batch = windows.gather(chosen, np.zeros(len(chosen), np.int64))
        with torch.inference_mode():
            logits = model(input_ids=batch.inputs).logits.float()
        losses = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none")
        total += float(losses.double().sum())
        counted += batch.counted()
    return total / counted


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(way: str, batch_size: int, seq_len: int, batches: int) -> dict:
    """One way, in this process: peak RSS before and after the loss, seconds, the loss."""
    torch.manual_seed(0)
    model = new_model(ModelParams(n_layer=4, hidden_size=256, n_head=4, max_position_embeddings=seq_len), VOCAB,
                      {"eos_token_id": 0}, seed=0).eval()
    n = batch_size * seq_len * batches + 1
    ids = np.random.default_rng(0).integers(0, VOCAB, n).astype(np.uint16)
    windows = StreamWindows(ids, np.ones(n, np.uint8), np.array([0]), seq_len)
    windows.gather(np.arange(1), np.zeros(1, np.int64))
    before = peak_mb()
    began = time.perf_counter()
    if way == "chunked head":
        loss = validation_loss(model, windows, batch_size)["val_loss"]
    else:
        loss = full_logits_loss(model, windows, batch_size)
    return {"way": way, "loss": loss, "seconds": time.perf_counter() - began, "peak_mb_before": before,
            "peak_mb": peak_mb()}


def main() -> None:
    """Both ways, each in a fresh process; prints a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8, help="evaluate.batch_size")
    parser.add_argument("--seq-len", type=int, default=1024, help="train.seq_len")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--way", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.way:
        print(json.dumps(measure(args.way, args.batch_size, args.seq_len, args.batches)))
        return
    results = []
    for way in ("full logits", "chunked head"):
        done = subprocess.run([sys.executable, __file__, "--way", way, "--batch-size", str(args.batch_size),
                               "--seq-len", str(args.seq_len), "--batches", str(args.batches)],
                              capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"{way:12s}: peak {r['peak_mb']:,.0f} MB ({r['peak_mb'] - r['peak_mb_before']:+,.0f} MB for the loss), "
              f"{r['seconds']:.1f} s, val loss {r['loss']:.6f}", flush=True)
    full, chunked = results
    print(f"chunked / full logits: {chunked['peak_mb'] / full['peak_mb']:.2f}x peak memory, "
          f"{chunked['seconds'] / full['seconds']:.2f}x time")
    print(json.dumps({"batch_size": args.batch_size, "seq_len": args.seq_len, "vocab": VOCAB, "ways": results}))


if __name__ == "__main__":
    main()
