"""Benchmark of the memory plan: peak memory measured for Llama-style models of about 10M, 50M and 120M parameters,
with and without activation checkpointing, next to the plan's estimate (stages/lib/modeling/memory.py), with the error.

    python bench/bench_memory.py                          # the six cases on the CPU
    python bench/bench_memory.py --sizes 120m --device cuda --precision bf16 --batch-size 8 --seq-len 1024

Each case runs in a fresh process on random token data: it builds the run's model and optimizer as the train stage
does and takes two optimizer steps through `Session.step` (the second with the AdamW state in place, as every later
step), timing each. Measured peak, from just before the model is built: the most memory tensors held at once (on
the CPU from the profiler's allocation events, on a GPU torch.cuda.max_memory_allocated), which is what the plan
estimates; and on the CPU the process's peak resident memory too (ru_maxrss), which adds what the C allocator keeps
after tensors are freed. Error = estimate / allocated peak - 1 (the bar is 25%). The step-time ratio of
checkpointed to plain is the cost of recomputing the blocks: `--time` measures it in one process, steps with and
without checkpointing interleaved on the same model (the profiler slows steps down; timings under it mean little).
"""

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import psutil
import torch
from torch.profiler import ProfilerActivity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_train import make_workspace  # noqa: E402

from stages.lib.base.params import parse_params  # noqa: E402
from stages.lib.distributed.world import World  # noqa: E402
from stages.lib.modeling import memory  # noqa: E402
from stages.lib.modeling.families import checkpoint_activations, model_config  # noqa: E402
from stages.lib.modeling.precision import pick_precision  # noqa: E402
from stages.lib.tokenizing.batches import TrainBatches, split_samples  # noqa: E402
from stages.lib.tokenizing.token_files import packing_for, read_meta  # noqa: E402
from stages.lib.training.loop import Session  # noqa: E402
from stages.lib.training.trainer import build_trainee, decide_on_main  # noqa: E402

SIZES = {  # Llama-style, tied embeddings; the vocabulary grows with the model as it does in practice
    "10m": {"vocab": 16384, "model": {"n_layer": 6, "hidden_size": 256, "n_head": 4, "intermediate_size": 1024}},
    "50m": {"vocab": 32768, "model": {"n_layer": 8, "hidden_size": 512, "n_head": 8, "intermediate_size": 2048}},
    "120m": {"vocab": 50257, "model": {"n_layer": 12, "hidden_size": 768, "n_head": 12, "intermediate_size": 2048}},
}


def _prepared(root: Path, case: dict):
    """Token files and params for a case: (train params, windows, decision, precision)."""
    spec = SIZES[case["size"]]
    device = torch.device(case["device"])
    make_workspace(root, spec["vocab"], n_tokens=max(100_000, 4 * case["batch_size"] * case["seq_len"]))
    train = parse_params({"train": {
        "model": {**spec["model"], "max_position_embeddings": case["seq_len"]}, "seq_len": case["seq_len"],
        "batch_size": case["batch_size"], "device": device.type, "precision": case["precision"],
        "activation_checkpointing": case["checkpointing"]}}).train
    train = replace(train, checkpoint_dir=str(root / "checkpoints"), out_dir=str(root / "outputs"))
    tokens = root / "data" / "tokens"
    meta = read_meta(tokens)
    windows = split_samples(tokens, "train", train.seq_len, packing_for(meta, train.packing), train.seed, required=True)
    decision = decide_on_main(train, meta, windows.count, root / "data" / "tokenizer",
                              root / "recovery", False, 1)
    return train, windows, decision, pick_precision(train.precision, device, warn=False)


def _session(root: Path, train, windows, decision, precision) -> Session:
    device = torch.device(train.device)
    trainee = build_trainee(train, decision, World(device=device), root / "outputs" / "live", precision)
    return Session(train, decision, trainee, precision,
                   TrainBatches(windows, train.seed, train.batch_size, train.grad_accum), None, time.monotonic(),
                   root / "recovery")


def measure(case: dict) -> dict:
    """One case in this process: the estimate and the measured peak (bytes), and the seconds of each step."""
    device = torch.device(case["device"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train, windows, decision, precision = _prepared(root, case)
        setup = memory.Setup(train.batch_size, train.seq_len, train.grad_accum, precision.name,
                             train.activation_checkpointing)
        plan = memory.plan_memory(memory.model_shape(model_config(train, decision.vocab_size, decision.special_ids)),
                                  setup)
        before = psutil.Process().memory_info().rss
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        profiling = case["profile"] and device.type == "cpu"
        with torch.profiler.profile(activities=[ProfilerActivity.CPU], profile_memory=True) if profiling else (
                contextlib.nullcontext()) as profiler:
            session = _session(root, train, windows, decision, precision)
            seconds = [session.step(step)[2] for step in range(2)]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before  # Linux: KiB
        allocated = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                     _peak_allocated(profiler) if profiling else None)
    return {**case, "parameters": plan.shape.parameters, "estimate": plan.peak, "allocated": allocated,
            "rss": rss if device.type == "cpu" else None, "parts": plan.parts, "seconds": seconds}


def _peak_allocated(profiler) -> int:
    """The most bytes held at once, from the profiler's allocation (+) and free (-) events in time order."""
    events = sorted((e for e in profiler.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak


def checkpointing_cost(case: dict, rounds: int) -> float:
    """Median step time with activation checkpointing over without, interleaved on one model in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        session = _session(root, *_prepared(root, {**case, "checkpointing": False}))
        model, ratios, step = session.model, [], 0
        session.step(step)  # warm-up: the optimizer state, first allocations
        for _ in range(rounds):
            times = {}
            for checkpointed in (False, True):
                if checkpointed:
                    checkpoint_activations(model)
                else:
                    getattr(model, "activation_checkpointing_disable", model.gradient_checkpointing_disable)()
                step += 1
                times[checkpointed] = session.step(step)[2]
            ratios.append(times[True] / times[False])
    return statistics.median(ratios)


def run_case(case: dict) -> dict:
    """`measure` in a fresh process, so each peak is its own."""
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Run the cases and print estimate vs measured, then a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10m,50m,120m")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-profile", action="store_true", help="measure peak RSS without the CPU profiler")
    parser.add_argument("--time", type=int, default=0, metavar="ROUNDS",
                        help="only time checkpointed against plain steps, interleaved, for this many rounds")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(json.loads(args.child))))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, {args.precision}, "
          f"micro-batch {args.batch_size} x {args.seq_len} tokens")
    base = {"device": args.device, "precision": args.precision, "batch_size": args.batch_size,
            "seq_len": args.seq_len}
    if args.time:
        for size in args.sizes.split(","):
            ratio = checkpointing_cost({**base, "size": size}, args.time)
            print(f"{size}: a step with activation checkpointing takes {ratio:.2f}x the time of one without "
                  f"(median of {args.time} interleaved pairs)", flush=True)
        return
    results = []
    for size in args.sizes.split(","):
        for checkpointing in (False, True):
            r = run_case({**base, "size": size, "checkpointing": checkpointing, "profile": not args.no_profile})
            results.append(r)
            measured = r["allocated"] or r["rss"]
            rss = f", peak RSS {memory.size(r['rss'])}" if r["rss"] else ""
            allocated = f"allocated {memory.size(r['allocated'])}" if r["allocated"] else "(not profiled)"
            print(f"{size:>5} ({r['parameters'] / 1e6:5.1f}M) checkpointing {'on ' if checkpointing else 'off'}: "
                  f"estimate {memory.size(r['estimate'])}, {allocated}{rss}, error "
                  f"{r['estimate'] / measured - 1:+.0%}, steps {r['seconds'][0]:.2f} s, {r['seconds'][1]:.2f} s",
                  flush=True)
    for plain, checkpointed in zip(results[::2], results[1::2]):
        key = "allocated" if plain["allocated"] else "rss"
        print(f"{plain['size']}: activation checkpointing {checkpointed[key] / plain[key]:.2f}x the memory, "
              f"{checkpointed['seconds'][1] / plain['seconds'][1]:.2f}x the step time")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
