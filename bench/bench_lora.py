"""Benchmark of LoRA (train.lora) against a full fine-tune of the same pretrained model (random weights): peak
memory, step time and what a session adds to DVC's cache; and, on a GPU, one LoRA session of a ~0.5B model with
its memory plan next to torch.cuda.max_memory_allocated.

    python bench/bench_lora.py                                 # Llama-style 124M on the CPU, LoRA r=16 vs full
    python bench/bench_lora.py --size qwen2-0.5b --device cuda --session       # one LoRA session on a GPU

Everything runs in a temporary folder on random token data, the base model saved there with random weights, as
train.init_from. Peak memory: each of the two runs in a fresh process builds its model and optimizer as the train
stage does and takes two optimizer steps through `Session.step`; measured as in bench/bench_memory.py (the most
memory tensors held at once: the profiler's allocation events on a CPU, torch.cuda.max_memory_allocated on a GPU),
next to the memory plan's estimate. Step time: the two sessions live in one process and their steps alternate, so
a machine whose load changes slows both alike; the ratio of medians is reported. Cache per session: the bytes of
the checkpoint each saves, and of each export (train.export: merged, adapter). `--session` runs the train stage
itself (`python -m stages.train`) for `--steps` LoRA steps and prints its memory plan and the peak it measured.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_memory import _peak_allocated  # noqa: E402
from bench_train import make_workspace  # noqa: E402

from stages.lib.base.files import folder_size  # noqa: E402
from stages.lib.base.params import parse_params  # noqa: E402
from stages.lib.checkpointing import store  # noqa: E402
from stages.lib.distributed.world import World  # noqa: E402
from stages.lib.modeling import (
    lora,  # noqa: E402
    memory,
)
from stages.lib.modeling.export import export_model  # noqa: E402
from stages.lib.modeling.families import model_config  # noqa: E402
from stages.lib.modeling.precision import pick_precision  # noqa: E402
from stages.lib.tokenizing.batches import TrainBatches, split_samples  # noqa: E402
from stages.lib.tokenizing.token_files import packing_for, read_meta  # noqa: E402
from stages.lib.training.loop import Session  # noqa: E402
from stages.lib.training.trainer import build_trainee, decide_on_main  # noqa: E402

SIZES = {
    "tiny": lambda: LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=512, tie_word_embeddings=True),
    # GPT-2 small's size in the Llama style (as bench/bench_train.py's gpt2-124m), its vocabulary, tied embeddings.
    "llama-124m": lambda: LlamaConfig(vocab_size=50257, hidden_size=768, intermediate_size=2048,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=1024,
                                      tie_word_embeddings=True),
    # Qwen2-0.5B's config (494M parameters).
    "qwen2-0.5b": lambda: Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                      num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                      max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True),
}


def prepare(root: Path, case: dict) -> None:
    """The base model folder (random weights, saved in `case["base_dtype"]`) and a workspace of random tokens."""
    config = SIZES[case["size"]]()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=getattr(torch, case["base_dtype"])).save_pretrained(root / "base")
    make_workspace(root, config.vocab_size, n_tokens=max(100_000, 8 * case["batch_size"] * case["seq_len"]))


def train_settings(root: Path, case: dict, lora_r: int) -> dict:
    """train.* of the run: the base in root/base, LoRA of rank `lora_r` (0: a full fine-tune)."""
    return {"init_from": str(root / "base"), "lora": {"r": lora_r}, "export": "both" if lora_r else "merged",
            "seq_len": case["seq_len"], "batch_size": case["batch_size"], "lr": 2e-4, "min_lr": 2e-5,
            "device": case["device"], "precision": case["precision"], "total_step_budget": 1000,
            "checkpoint_dir": str(root / f"checkpoints-{lora_r}"), "out_dir": str(root / f"outputs-{lora_r}")}


def build_session(root: Path, case: dict, settings: dict) -> Session:
    """A session of the run with these train.* `settings` (as `train_settings` makes them), built as the train stage
    builds it, on this process."""
    train = parse_params({"train": settings}).train
    tokens = root / "data" / "tokens"
    meta = read_meta(tokens)
    windows = split_samples(tokens, "train", train.seq_len, packing_for(meta, train.packing), train.seed, required=True)
    decision = decide_on_main(train, meta, windows.count, root / "data" / "tokenizer", root / "recovery", False, 1)
    device = torch.device(case["device"])
    precision = pick_precision(train.precision, device, warn=False)
    trainee = build_trainee(train, decision, World(device=device), Path(train.out_dir) / "live", precision)
    return Session(train, decision, trainee, precision, TrainBatches(windows, train.seed, train.batch_size, 1),
                   None, time.monotonic(), root / "recovery")


def plan(session: Session, case: dict) -> memory.MemoryPlan:
    """The memory plan the train stage prints for this session."""
    train, decision = session.train, session.decision
    shape = memory.model_shape(model_config(train, decision.vocab_size, decision.special_ids))
    setup = memory.Setup(train.batch_size, train.seq_len, 1, session.precision.name,
                         **lora.checked_plan_settings(train, decision.vocab_size, shape))
    return memory.plan_memory(shape, setup)


def measure(case: dict) -> dict:
    """In this process: the peak memory of two steps of one run (`case["lora_r"]`), and the plan's estimate."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, case)
        cuda = case["device"] == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with (contextlib.nullcontext() if cuda else torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)) as profiler:
            session = build_session(root, case, train_settings(root, case, case["lora_r"]))
            for step in range(2):
                session.step(step)
        peak = torch.cuda.max_memory_allocated() if cuda else _peak_allocated(profiler)
        return {"allocated": peak, "estimate": plan(session, case).peak,
                "parameters": sum(p.numel() for p in session.model.parameters()),
                "trained": sum(p.numel() for p in session.model.parameters() if p.requires_grad)}


def in_fresh_process(case: dict, script: str = __file__) -> dict:
    """`measure` of `script` (run with `--child`) in a child process, so each peak is its own."""
    done = subprocess.run([sys.executable, script, "--child", json.dumps(case), "--threads",
                           str(torch.get_num_threads())], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def times_and_sizes(case: dict, rounds: int, settings_in: Callable[[Path], dict[str, dict]]) -> dict:
    """The runs `settings_in(root)` names (name -> its train.* settings), in this process: their step times
    interleaved (medians), and what a session of each saves."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, case)
        sessions = {name: build_session(root, case, settings) for name, settings in settings_in(root).items()}
        for s in sessions.values():
            s.step(0)  # warm-up: first allocations, the optimizer state
        times = {name: [] for name in sessions}
        for step in range(1, rounds + 1):
            for name, s in sessions.items():
                times[name].append(s.step(step)[2])
        sizes = {name: saved_bytes(root, s, rounds + 1) for name, s in sessions.items()}
    return {"seconds_per_step": {name: statistics.median(t) for name, t in times.items()}, "cache": sizes}


def saved_bytes(root: Path, session: Session, step: int) -> dict:
    """The bytes of the checkpoint the session saves at `step`, and of each of its exports."""
    state = {"step": step, "fingerprint": session.plan.fingerprint, "fingerprint_values": session.plan.values}
    captured = store.save(Path(session.train.checkpoint_dir), root / "recovery", session.trainee, state)
    sizes = {"checkpoint": folder_size(Path(session.train.checkpoint_dir) / store.folder_name(step))}
    train, decision = session.train, session.decision
    for export in ("adapter", "merged") if train.lora.r else ("merged",):
        model = (lora.trained_model(train, decision.vocab_size, decision.special_ids, captured["adapters"])
                 if train.lora.r else session.model)
        folder = root / f"export-{train.lora.r}-{export}"
        export_model(model, root / "data" / "tokenizer", folder, export=export, base_model=train.init_from)
        sizes[f"export {export}"] = folder_size(folder)
    return sizes


def one_session(case: dict) -> list[str]:
    """Run the train stage for `case["steps"]` LoRA steps in a temporary workspace; the lines of its output about
    memory."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        prepare(root, case)
        train = {**train_settings(root, case, case["lora_r"]), "steps_today": case["steps"], "export": "adapter",
                 "save_every": case["steps"], "eval_every": 10 ** 9, "eval_batches": 1,
                 "activation_checkpointing": case["checkpointing"]}
        (root / "params.yaml").write_text(yaml.safe_dump({"train": train}))
        done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                                   "DVC_STUDIO_OFFLINE": "1"})
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    keep = ("memory plan", "weights", "peak", "run of", "exported")
    return [line.strip() for line in done.stdout.splitlines() if line.lstrip().startswith(keep) or "peak" in line]


def add_arguments(parser: argparse.ArgumentParser, sizes: dict, *, rounds: str, session: str, steps: str,
                  checkpointing: str, threads: str) -> None:
    """The arguments of this bench and of bench/bench_qlora.py: `--size` (one of `sizes`), the case, and the help
    texts of those whose meaning differs between them."""
    parser.add_argument("--size", choices=sorted(sizes), default="llama-124m")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help=rounds)
    parser.add_argument("--session", action="store_true", help=session)
    parser.add_argument("--steps", type=int, default=20, help=steps)
    parser.add_argument("--activation-checkpointing", action="store_true", help=checkpointing)
    parser.add_argument("--threads", type=int, default=0, help=threads)
    parser.add_argument("--child", help=argparse.SUPPRESS)


def case_of(args: argparse.Namespace) -> dict:
    """The case those arguments describe."""
    return {"size": args.size, "device": args.device, "precision": args.precision, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "lora_r": args.lora_r, "steps": args.steps,
            "checkpointing": args.activation_checkpointing,
            "base_dtype": "bfloat16" if args.device == "cuda" else "float32"}  # as pretrained models are shipped


def main() -> None:
    """Run the comparison (or one session) and print it, then a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, SIZES, rounds="interleaved steps timed per run",
                  session="run one LoRA session of the train stage instead", steps="steps of that session",
                  checkpointing="for that session",
                  threads="torch threads (0: torch's default); on a busy machine 1 thread gives steadier figures")
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
        lines = one_session(case)
        print("\n".join(lines))
        print(json.dumps({"case": case, "lines": lines}))
        return
    peaks = {name: in_fresh_process({**case, "lora_r": r}) for name, r in (("full", 0), ("lora", args.lora_r))}
    result = {"case": case, "memory": peaks, **times_and_sizes(case, args.rounds, lambda root: {
        "full": train_settings(root, case, 0), "lora": train_settings(root, case, case["lora_r"])})}
    for name in ("full", "lora"):
        m, cache = peaks[name], result["cache"][name]
        stored = ", ".join(f"{part} {memory.size(n)}" for part, n in cache.items())
        print(f"{name:>4}: {m['trained']:,} of {m['parameters']:,} parameters train; peak "
              f"{memory.size(m['allocated'])} (plan {memory.size(m['estimate'])}); "
              f"{result['seconds_per_step'][name]:.2f} s/step; a session saves {stored}")
    ratio = {"peak memory": peaks["lora"]["allocated"] / peaks["full"]["allocated"],
             "step time": result["seconds_per_step"]["lora"] / result["seconds_per_step"]["full"],
             "checkpoint": result["cache"]["lora"]["checkpoint"] / result["cache"]["full"]["checkpoint"]}
    print("LoRA / full: " + ", ".join(f"{name} {value:.3f}x" for name, value in ratio.items()))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
