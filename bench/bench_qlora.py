"""Benchmark of the ways to fit a fine-tune in less memory, on one pretrained model (random weights): a full fine-tune
with AdamW and with 8-bit AdamW (train.optimizer: adamw8bit), LoRA, and QLoRA (train.lora.quantize: nf4): peak
memory, step time and what a session adds to DVC's cache; and, on a GPU, one session of QLoRA and one of LoRA
through the train stage, their tokens/s and the peak memory they print.

    python bench/bench_qlora.py                                  # Llama-style 124M on the CPU, the four ways
    python bench/bench_qlora.py --size llama-1b --device cuda --session   # QLoRA vs LoRA sessions on a GPU

As bench/bench_lora.py (whose helpers it uses): peak memory is measured in a fresh process per way, the most memory
tensors held at once while the model and optimizer are built as the train stage builds them (the 4-bit base
quantized as it loads) and two optimizer steps run (the profiler's allocation events on a CPU,
torch.cuda.max_memory_allocated on a GPU). Step times: the four sessions live in one process and their steps
alternate, so a change in the machine's load slows all alike; medians are reported. Cache per session: the bytes of
the checkpoint each saves and of its exports.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_lora  # noqa: E402
from bench_lora import SIZES, prepare, saved_bytes  # noqa: E402
from bench_memory import _peak_allocated  # noqa: E402

from stages.lib.base.params import parse_params  # noqa: E402
from stages.lib.distributed.world import World  # noqa: E402
from stages.lib.modeling import memory  # noqa: E402
from stages.lib.modeling.precision import pick_precision  # noqa: E402
from stages.lib.tokenizing.batches import TrainBatches, split_samples  # noqa: E402
from stages.lib.tokenizing.token_files import packing_for, read_meta  # noqa: E402
from stages.lib.training.loop import Session  # noqa: E402
from stages.lib.training.trainer import build_trainee, decide_on_main  # noqa: E402

# A Llama-3.2-1B-shaped model (1.24B parameters with its 128k vocabulary, tied embeddings), for a GPU.
SIZES = {**SIZES, "llama-1b": lambda: LlamaConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True)}
bench_lora.SIZES = SIZES  # prepare() builds the base from this table

WAYS = {  # name -> the train.* settings that make it
    "full adamw": {"lora": {"r": 0}, "optimizer": "adamw"},
    "full adamw8bit": {"lora": {"r": 0}, "optimizer": "adamw8bit"},
    "lora": {"lora": {"r": 16}},
    "qlora": {"lora": {"r": 16, "quantize": "nf4"}},
}


def train_settings(root: Path, case: dict, way: str) -> dict:
    """train.* of one way: the base in root/base, its own checkpoint and output folders."""
    slug = way.replace(" ", "-")
    settings = {"init_from": str(root / "base"), "seq_len": case["seq_len"], "batch_size": case["batch_size"],
                "lr": 2e-4, "min_lr": 2e-5, "device": case["device"], "precision": case["precision"],
                "total_step_budget": 1000, "checkpoint_dir": str(root / f"checkpoints-{slug}"),
                "out_dir": str(root / f"outputs-{slug}"), **WAYS[way]}
    settings["lora"] = {**settings["lora"], "r": settings["lora"]["r"] and case["lora_r"]}
    return settings


def build_session(root: Path, case: dict, way: str) -> Session:
    """A session of that way's run as the train stage builds it, on this process."""
    train = parse_params({"train": train_settings(root, case, way)}).train
    tokens = root / "data" / "tokens"
    meta = read_meta(tokens)
    windows = split_samples(tokens, "train", train.seq_len, packing_for(meta, train.packing), train.seed, required=True)
    decision = decide_on_main(train, meta, windows.count, root / "data" / "tokenizer", root / "recovery", False, 1)
    device = torch.device(case["device"])
    precision = pick_precision(train.precision, device, warn=False)
    trainee = build_trainee(train, decision, World(device=device), Path(train.out_dir) / "live", precision)
    return Session(train, decision, trainee, precision, TrainBatches(windows, train.seed, train.batch_size, 1),
                   None, time.monotonic(), root / "recovery")


def measure(case: dict) -> dict:
    """In this process: the peak memory of building `case["way"]` and two of its steps."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, case)
        cuda = case["device"] == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            session = build_session(root, case, case["way"])
            for step in range(2):
                session.step(step)
            peak = torch.cuda.max_memory_allocated()
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as profiler:
                session = build_session(root, case, case["way"])
                for step in range(2):
                    session.step(step)
            peak = _peak_allocated(profiler)
        return {"allocated": peak, "parameters": sum(p.numel() for p in session.model.parameters()),
                "trained": sum(p.numel() for p in session.model.parameters() if p.requires_grad)}


def in_fresh_process(case: dict) -> dict:
    """`measure` in a child process, so each peak is its own."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(case), "--threads",
                           str(torch.get_num_threads())], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def times_and_sizes(case: dict, rounds: int) -> dict:
    """The four ways in this process: their step times interleaved (medians), and what a session of each saves."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, case)
        sessions = {way: build_session(root, case, way) for way in WAYS}
        for s in sessions.values():
            s.step(0)  # warm-up: first allocations, the optimizer state
        times = {way: [] for way in sessions}
        for step in range(1, rounds + 1):
            for way, s in sessions.items():
                times[way].append(s.step(step)[2])
        sizes = {way: saved_bytes(root, s, rounds + 1) for way, s in sessions.items()}
    return {"seconds_per_step": {way: statistics.median(t) for way, t in times.items()}, "cache": sizes}


def sessions_through_the_stage(case: dict) -> dict:
    """One session of `case["steps"]` steps of QLoRA and of LoRA through the train stage; per way, its tokens/s
    (the last progress line) and its lines about memory."""
    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, case)
        for way in ("qlora", "lora"):
            train = {**train_settings(root, case, way), "steps_today": case["steps"], "export": "adapter",
                     "save_every": case["steps"], "eval_every": 10 ** 9, "eval_batches": 1, "log_every": 5,
                     "activation_checkpointing": case["checkpointing"]}
            (root / "params.yaml").write_text(yaml.safe_dump({"train": train}))
            done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=root, capture_output=True, text=True,
                                  env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                       "DVC_STUDIO_OFFLINE": "1"})
            if done.returncode:
                raise RuntimeError(f"{way}: {done.stderr[-3000:]}")
            lines = done.stdout.splitlines()
            rates = [float(line.split(" tokens/s")[0].rsplit(" ", 1)[-1].replace(",", ""))
                     for line in lines if " tokens/s" in line]
            found[way] = {"tokens_per_s": rates[-1] if rates else None,
                          "memory": [line.strip() for line in lines if "peak" in line or "weights" in line]}
    return found


def main() -> None:
    """Run the comparison (or the two sessions) and print it, then a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="llama-124m")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved steps timed per way")
    parser.add_argument("--session", action="store_true", help="run a QLoRA and a LoRA session of the train stage")
    parser.add_argument("--steps", type=int, default=20, help="steps of those sessions")
    parser.add_argument("--activation-checkpointing", action="store_true", help="for those sessions")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    case = {"size": args.size, "device": args.device, "precision": args.precision, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "lora_r": args.lora_r, "steps": args.steps,
            "checkpointing": args.activation_checkpointing,
            "base_dtype": "bfloat16" if args.device == "cuda" else "float32"}  # as pretrained models are shipped
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.size}, micro-batch "
          f"{args.batch_size} x {args.seq_len} tokens, LoRA r={args.lora_r}", flush=True)
    if args.session:
        found = sessions_through_the_stage(case)
        for way, result in found.items():
            print(f"{way}: {result['tokens_per_s']} tokens/s; " + "; ".join(result["memory"]))
        if found["qlora"]["tokens_per_s"] and found["lora"]["tokens_per_s"]:
            print(f"QLoRA / LoRA tokens/s: {found['qlora']['tokens_per_s'] / found['lora']['tokens_per_s']:.3f}x")
        print(json.dumps({"case": case, "sessions": found}))
        return
    started = time.monotonic()
    peaks = {way: in_fresh_process({**case, "way": way}) for way in WAYS}
    result = {"case": case, "memory": peaks, **times_and_sizes(case, args.rounds)}
    for way in WAYS:
        m, cache = peaks[way], result["cache"][way]
        stored = ", ".join(f"{part} {memory.size(n)}" for part, n in cache.items())
        print(f"{way:>14}: {m['trained']:,} of {m['parameters']:,} parameters train; peak "
              f"{memory.size(m['allocated'])} ({m['allocated'] / peaks['full adamw']['allocated']:.2f}x); "
              f"{result['seconds_per_step'][way]:.2f} s/step; a session saves {stored}")
    print(f"in {time.monotonic() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
