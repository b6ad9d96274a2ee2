"""Benchmark of the ways to fit a fine-tune in less memory, on one pretrained model (random weights): a full fine-tune
with AdamW and with 8-bit AdamW (train.optimizer: adamw8bit), LoRA, and QLoRA (train.lora.quantize: nf4): peak
memory, step time and what a session adds to DVC's cache; and, on a GPU, one session of QLoRA and one of LoRA
through the train stage, their tokens/s and the peak memory they print.

    python bench/bench_qlora.py                                  # Llama-style 124M on the CPU, the four ways
    python bench/bench_qlora.py --size llama-1b --device cuda --session   # QLoRA vs LoRA sessions on a GPU

As bench/bench_lora.py (whose helpers it uses): peak memory is measured in a fresh process per way, the most memory
tensors held at once while the model and optimizer are built as the train stage builds them (the 4-bit base
quantized as it loads, which may be the peak) and two optimizer steps run; also what is held once built and the
most held during the steps (the profiler's allocation events on a CPU,
torch.cuda.max_memory_allocated on a GPU). Step times: the four sessions live in one process and their steps
alternate, so a change in the machine's load slows all alike; medians are reported. Cache per session: the bytes of
the checkpoint each saves and of its exports.
"""

import argparse
import json
import os
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
from bench_lora import (  # noqa: E402
    SIZES,
    add_arguments,
    build_session,
    case_of,
    in_fresh_process,
    prepare,
    times_and_sizes,
)
from bench_memory import _peak_allocated  # noqa: E402

from stages.lib.modeling import memory  # noqa: E402

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


def measure(case: dict) -> dict:
    """In this process: the peak memory of building `case["way"]` and two of its steps."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, case)
        cuda = case["device"] == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            session = build_session(root, case, train_settings(root, case, case["way"]))
            held, built = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            for step in range(2):
                session.step(step)
            in_steps = torch.cuda.max_memory_allocated()
            peak = max(built, in_steps)
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as profiler:
                session = build_session(root, case, train_settings(root, case, case["way"]))
                torch.empty(MARK, dtype=torch.uint8)  # where building ends, in the allocation events
                for step in range(2):
                    session.step(step)
            peak = _peak_allocated(profiler)
            held, in_steps = _held_and_peak_after_mark(profiler)
        return {"allocated": peak, "held_after_build": held, "peak_in_steps": in_steps,
                "parameters": sum(p.numel() for p in session.model.parameters()),
                "trained": sum(p.numel() for p in session.model.parameters() if p.requires_grad)}


MARK = 12_345_679  # bytes of a marker allocation: a size nothing else allocates


def _held_and_peak_after_mark(profiler) -> tuple[int, int]:
    """Bytes held when the marker was allocated (the model and optimizer built: what the session keeps), and the
    most held at once after it (during the steps); the peak over everything may be the load's."""
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held, mark, peak = 0, None, 0
    for event in events:
        if mark is None and event.nbytes() == MARK:
            mark = held
        held += event.nbytes()
        if mark is not None:
            peak = max(peak, held)
    return mark, peak


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
    add_arguments(parser, SIZES, rounds="interleaved steps timed per way",
                  session="run a QLoRA and a LoRA session of the train stage", steps="steps of those sessions",
                  checkpointing="for those sessions", threads="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    case = case_of(args)
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
    peaks = {way: in_fresh_process({**case, "way": way}, __file__) for way in WAYS}
    result = {"case": case, "memory": peaks,
              **times_and_sizes(case, args.rounds, lambda root: {way: train_settings(root, case, way) for way in WAYS})}
    for way in WAYS:
        m, cache = peaks[way], result["cache"][way]
        stored = ", ".join(f"{part} {memory.size(n)}" for part, n in cache.items())
        print(f"{way:>14}: {m['trained']:,} of {m['parameters']:,} parameters train; peak "
              f"{memory.size(m['allocated'])} ({m['allocated'] / peaks['full adamw']['allocated']:.2f}x), "
              f"{memory.size(m['held_after_build'])} held once built, {memory.size(m['peak_in_steps'])} "
              f"({m['peak_in_steps'] / peaks['full adamw']['peak_in_steps']:.2f}x) at most in the steps; "
              f"{result['seconds_per_step'][way]:.2f} s/step; a session saves {stored}")
    print(f"in {time.monotonic() - started:.0f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
