"""Benchmark of the train loop: tokens/s and model FLOP/s next to the measured matmul peak (and, on a GPU, the
MFU against the card's bf16 peak), against a plain HuggingFace loop; `documents` against `stream` packing on the
same documents; and the time from process start to the first step when resuming far into a run, in both packings.

    python bench/bench_train.py                      # both configs, 3 interleaved rounds (on a GPU if there is one)
    python bench/bench_train.py --configs gpt2-16m --rounds 5 --steps 3
    python bench/bench_train.py --device cpu --startup-only
    python bench/bench_train.py --configs gpt2-16m,gpt2-124m --no-startup --compile   # on a GPU

Everything runs on random token data in a temporary folder. Each round times, in the same process and one after
the other, a matmul peak (torch.mm in the loop's compute type: 2048 x 2048 on CPU, 8192 x 8192 on a GPU), our
training step (`Session.step`: chunked loss, fused AdamW, clipping; autocast as train.precision picks it) and the
baseline (`model(input_ids, labels=...)`, default AdamW, clipping, the same autocast), so a machine whose load
changes affects all three alike; medians are reported. Model FLOPs per token = 6N + 12 * L * H * Q * T (N
parameters, L layers, H heads, Q head size, T context). MFU = model FLOP/s / the GPU's dense 16-bit peak from its
data sheet (GPU_PEAK_TFLOPS, by device name), or the measured matmul peak for a card not in the table.
`--precision fp16` times fp16 autocast with loss scaling (both loops), as on a T4 or V100.
The packing rounds time our step in both packings, one after the other, on instruction documents whose median
length is a third of seq_len; document tokens/s leave out the padding, which `stream` does not have.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.lib.base.params import parse_params  # noqa: E402
from stages.lib.distributed.world import World  # noqa: E402
from stages.lib.modeling.families import build_model  # noqa: E402
from stages.lib.modeling.precision import pick_precision  # noqa: E402
from stages.lib.tokenizing.batches import TrainBatches, split_samples  # noqa: E402
from stages.lib.tokenizing.token_files import SplitWriter, new_meta, packing_for, read_meta, write_meta  # noqa: E402
from stages.lib.training.loop import Session  # noqa: E402
from stages.lib.training.trainer import build_trainee, decide_on_main  # noqa: E402

CONFIGS = {
    # params.yaml defaults, with the 1,024-token BPE vocabulary the default tokenizer stage trains.
    "default": {"vocab": 1024, "train": {}},
    # The GPT-2-style ~16M model of the performance notes, with the GPT-2 vocabulary.
    "gpt2-16m": {"vocab": 50257, "train": {"model": {"n_layer": 4, "hidden_size": 256, "n_head": 4,
                                                     "max_position_embeddings": 256},
                                           "seq_len": 256, "batch_size": 8}},
    # GPT-2 small's size (12 layers, 768 wide, 12 heads, context 1024, its vocabulary) in the Llama style: a gated
    # MLP 2,048 wide keeps it at 124M parameters. For GPUs: on a CPU a step takes minutes.
    "gpt2-124m": {"vocab": 50257, "train": {"model": {"n_layer": 12, "hidden_size": 768, "n_head": 12,
                                                      "intermediate_size": 2048, "max_position_embeddings": 1024},
                                            "seq_len": 1024, "batch_size": 16}},
}


def make_workspace(root: Path, vocab: int, n_tokens: int, seed: int = 0, median_document: int = 0) -> None:
    """A word-level tokenizer of `vocab` entries and random token files written by the tokenize stage's writer:
    one plain-text document per split, or (`median_document` > 0) instruction documents of lognormal lengths
    around that median, each ending with EOS."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    words = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<eos>")),
                                        eos_token="<eos>")
    tokenizer.save_pretrained(root / "data" / "tokenizer")
    tokens = root / "data" / "tokens"
    tokens.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    meta = new_meta(vocab, 0, "bench", save_bin=True, save_jsonl=False)
    for split, n in (("train", n_tokens), ("val", n_tokens // 20)):
        lengths = np.array([n])
        if median_document:
            lengths = np.maximum(2, rng.lognormal(np.log(median_document), 0.6, n // median_document)).astype(int)
        ids = rng.integers(1, vocab, int(lengths.sum()))
        ids[np.cumsum(lengths) - 1] = 0  # EOS ends every document
        with SplitWriter(tokens, split, meta["dtype"], save_bin=True, save_jsonl=False) as writer:
            writer.write(ids, np.ones(len(ids), np.uint8), lengths, with_prompt=len(lengths) if median_document else 0)
        meta["splits"][split] = writer.summary()
    write_meta(tokens, meta)


def our_session(root: Path, train, device: torch.device) -> Session:
    """Our training session over the workspace's token files, built the way the train stage builds it."""
    tokens = root / "data" / "tokens"
    train = replace(train, checkpoint_dir=str(root / "checkpoints"), out_dir=str(root / "outputs"))
    meta = read_meta(tokens)
    samples = split_samples(tokens, "train", train.seq_len, packing_for(meta, train.packing), train.seed,
                            required=True)
    decision = decide_on_main(train, meta, samples.count, root / "data" / "tokenizer", root / "recovery", False, 1)
    batches = TrainBatches(samples, train.seed, train.batch_size, train.grad_accum)
    precision = pick_precision(train.precision, device)
    trainee = build_trainee(train, decision, World(device=device), root / "outputs" / "live", precision)
    return Session(train, decision, trainee, precision, batches, None, time.monotonic(), root / "recovery")


# Dense 16-bit tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets, by a part of the device name:
# bf16, or fp16 on the cards without native bf16 (T4, V100; the P100 has no tensor cores). The first match wins,
# so the more specific names come first.
GPU_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("B200", 2250.0),
                   ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
                   ("T4", 65.0), ("V100", 125.0), ("P100", 18.7)]


def gpu_peak_tflops(name: str) -> float | None:
    """The data-sheet dense 16-bit peak of the GPU called `name` (torch.cuda.get_device_name), or None."""
    return next((peak for part, peak in GPU_PEAK_TFLOPS if part in name), None)


def matmul_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 3) -> float:
    """Measured torch.mm throughput in GFLOP/s (best of `repeats`) in `dtype`, the loop's compute type."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b), device) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(fn, device: torch.device = torch.device("cpu")) -> float:
    _sync(device)
    began = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - began


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(model, seq_len: int) -> float:
    """6N + 12 * L * H * Q * T: matmul FLOPs of a forward and backward pass per token (N counts tied weights once)."""
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    head_dim = c.hidden_size // c.num_attention_heads
    return 6 * n + 12 * c.num_hidden_layers * c.num_attention_heads * head_dim * seq_len


class Baseline:
    """The nanoGPT-like loop: the model's own forward with labels, default AdamW, clipping (and GradScaler in fp16)."""

    def __init__(self, model, train, batches: TrainBatches, device: torch.device, precision):
        self.model, self.train, self.batches = model.to(device), train, batches
        self.device, self.autocast = device, precision.autocast
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision.scales_loss)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2),
                                           weight_decay=train.weight_decay)

    def step(self, step: int) -> None:
        """One optimizer step over the same batches our loop reads."""
        for batch in self.batches.step_batches(step):
            inputs, labels = batch.inputs, batch.labels
            # HuggingFace shifts labels itself: give it the window and labels aligned with the inputs.
            window = torch.cat([inputs, labels[:, -1:].clamp(min=0)], dim=1).to(self.device)
            shifted = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1).to(self.device)
            with self.autocast():
                loss = self.model(input_ids=window, labels=shifted).loss
            self.scaler.scale(loss / self.train.grad_accum).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def bench_loop(name: str, rounds: int, steps: int, device: torch.device, precision: str = "auto",
               compile: bool = False) -> dict:
    """Interleaved rounds of peak / ours / baseline for one config; returns the medians."""
    spec = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = parse_params({"train": {**spec["train"], "device": device.type, "precision": precision,
                                        "compile": compile}}).train
        make_workspace(root, spec["vocab"], n_tokens=max(200_000, 50 * train.seq_len * train.batch_size))
        ours = our_session(root, train, device)
        ours_model, batches = ours.model, ours.batches
        base = Baseline(build_model(train, ours.decision.vocab_size, ours.decision.special_ids), train, batches,
                        device, ours.precision)
        per_token = flops_per_token(ours_model, train.seq_len)
        tokens = batches.samples_per_step * train.seq_len
        ours.step(0), base.step(0)  # warm-up: first-call allocations
        times = {"peak": [], "ours": [], "baseline": []}
        for r in range(rounds):
            times["peak"].append(matmul_gflops(device, ours.precision.autocast_dtype or torch.float32))
            for loop, run in (("ours", ours), ("baseline", base)):
                times[loop].append(statistics.median(_timed(lambda s=s: run.step(s), device)
                                                     for s in range(1, steps + 1)))
            print(f"  {name} round {r + 1}: peak {times['peak'][-1]:.0f} GFLOP/s, ours {times['ours'][-1]:.3f} "
                  f"s/step, baseline {times['baseline'][-1]:.3f} s/step", flush=True)
    peak = statistics.median(times["peak"])
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    sheet = gpu_peak_tflops(card) if card else None
    result = {"config": name, "device": card or "cpu", "precision": ours.precision.name,
              "parameters": sum(p.numel() for p in ours_model.parameters()),
              "tokens_per_step": tokens, "gflop_per_token": per_token / 1e9, "peak_gflops": peak,
              "datasheet_peak_gflops": sheet * 1e3 if sheet else None}
    for loop in ("ours", "baseline"):
        seconds = statistics.median(times[loop])
        gflops = tokens * per_token / seconds / 1e9
        result[loop] = {"tokens_per_s": tokens / seconds, "gflops": gflops, "share_of_peak": gflops / peak,
                        "mfu": gflops / (sheet * 1e3 if sheet else peak) if device.type == "cuda" else None}
    result["speedup"] = statistics.median(times["baseline"]) / statistics.median(times["ours"])
    return result


def bench_packing(name: str, rounds: int, steps: int, device: torch.device) -> dict:
    """Our step in `stream` and in `documents` packing on the same instruction documents (median a third of
    seq_len), interleaved: token positions/s, document tokens/s (padding excluded) and the padding share."""
    spec = CONFIGS[name]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train = parse_params({"train": {**spec["train"], "device": device.type}}).train
        make_workspace(root, spec["vocab"], n_tokens=max(200_000, 50 * train.seq_len * train.batch_size),
                       median_document=train.seq_len // 3)
        sessions = {packing: our_session(root, replace(train, packing=packing), device)
                    for packing in ("stream", "documents")}
        for session in sessions.values():
            session.step(0)  # warm-up: first-call allocations
        times = {packing: [] for packing in sessions}
        for r in range(rounds):
            for packing, session in sessions.items():
                times[packing].append(statistics.median(_timed(lambda s=s: session.step(s), device)
                                                        for s in range(1, steps + 1)))
            print(f"  {name} packing round {r + 1}: " + ", ".join(f"{p} {t[-1]:.3f} s/step" for p, t in
                                                                  times.items()), flush=True)
    result = {"config": name}
    for packing, session in sessions.items():
        padding = session.batches.samples.facts()["padding_share"]
        positions = session.batches.samples_per_step * train.seq_len / statistics.median(times[packing])
        result[packing] = {"positions_per_s": positions, "tokens_per_s": positions * (1 - padding),
                           "padding_share": padding}
    result["documents_over_stream"] = result["documents"]["tokens_per_s"] / result["stream"]["tokens_per_s"]
    return result


CHILD = """
import json, sys, time
from stages.lib.base.params import load_params
from stages.lib.training.trainer import run_session
result = run_session(load_params().train)
print(json.dumps({"start_step": result.start_step, "first_step_at": result.first_step_at}))
"""


def _session(root: Path, train: dict) -> dict:
    (root / "params.yaml").write_text(yaml.safe_dump({"train": train}))
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin", "DVC_STUDIO_OFFLINE": "1",
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    began = time.monotonic()  # CLOCK_MONOTONIC is shared by the processes of one machine
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return {"start_step": out["start_step"], "seconds_to_first_step": out["first_step_at"] - began}


def bench_startup(far_step: int, repeats: int, packing: str) -> dict:
    """Seconds from process start to the end of the first step: a new run vs resuming at step `far_step`, on 20M
    tokens of plain text (stream) or of instruction documents of about 85 tokens (documents)."""
    spec = CONFIGS["gpt2-16m"]
    train = {**spec["train"], "device": "cpu", "total_step_budget": 2 * far_step, "steps_today": 1,
             "eval_batches": 1, "save_every": 10**9, "eval_every": 10**9, "packing": packing}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_workspace(root, spec["vocab"], n_tokens=20_000_000, median_document=85 if packing == "documents" else 0)
        _session(root, train)  # step 1's checkpoint, renamed below as if the run had reached far_step
        checkpoint = next((root / "checkpoints").glob("step-*"))
        state = json.loads((checkpoint / "state.json").read_text())
        state["step"] = far_step
        (checkpoint / "state.json").write_text(json.dumps(state))
        checkpoint.rename(checkpoint.with_name(f"step-{far_step:08d}"))
        for recovery in (root / ".checkpoint-recovery").glob("step-*"):
            recovery.rename(recovery.with_name(f"step-{far_step:08d}"))
            (recovery.with_name(f"step-{far_step:08d}") / "state.json").write_text(json.dumps(state))
        times = {f"{packing}, new run": [], f"{packing}, resume at step {far_step:,}": []}
        for _ in range(repeats):
            times[f"{packing}, new run"].append(_session(root, {**train, "resume": "never", "checkpoint_dir": "scratch",
                                                                "out_dir": "scratch-out"}))
            resumed = _session(root, train)
            assert resumed["start_step"] == far_step, resumed
            times[f"{packing}, resume at step {far_step:,}"].append(resumed)
            # Put the far checkpoint back for the next repeat (the session saved far_step + 1).
            for folder in (root / "checkpoints", root / ".checkpoint-recovery"):
                latest = next(folder.glob("step-*"))
                state = json.loads((latest / "state.json").read_text())
                state["step"] = far_step
                (latest / "state.json").write_text(json.dumps(state))
                latest.rename(latest.with_name(f"step-{far_step:08d}"))
    return {name: statistics.median(t["seconds_to_first_step"] for t in runs) for name, runs in times.items()}


def main() -> None:
    """Run the benchmarks and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="default,gpt2-16m")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per loop per round")
    parser.add_argument("--startup-repeats", type=int, default=2)
    parser.add_argument("--far-step", type=int, default=1_000_000)
    parser.add_argument("--startup-only", action="store_true")
    parser.add_argument("--no-startup", action="store_true")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where the loops run (auto: a GPU when there is one); the startup benchmark uses the CPU")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="train.precision of our loop (auto: bf16 on GPUs with native bf16, fp16 on older ones)")
    parser.add_argument("--compile", action="store_true", help="train.compile: true for our loop")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default); on a busy machine 1 thread gives steadier figures")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, loops on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    results = {"loops": [], "packing": [], "startup": None}
    if not args.startup_only:
        for name in args.configs.split(","):
            results["loops"].append(bench_loop(name, args.rounds, args.steps, device, args.precision, args.compile))
            results["packing"].append(bench_packing(name, args.rounds, args.steps, device))
    if not args.no_startup:
        results["startup"] = {**bench_startup(args.far_step, args.startup_repeats, "stream"),
                              **bench_startup(args.far_step, args.startup_repeats, "documents")}
    for r in results["loops"]:
        sheet = f", data-sheet peak {r['datasheet_peak_gflops']:.0f}" if r["datasheet_peak_gflops"] else ""
        print(f"{r['config']} on {r['device']} ({r['precision']}): {r['parameters']:,} parameters, "
              f"{r['gflop_per_token'] * 1e3:.1f} MFLOP/token, matmul peak {r['peak_gflops']:.0f} GFLOP/s{sheet}")
        for loop in ("ours", "baseline"):
            x = r[loop]
            mfu = f"  MFU {100 * x['mfu']:4.1f}%" if x["mfu"] is not None else ""
            print(f"  {loop:8s} {x['tokens_per_s']:10,.0f} tokens/s  {x['gflops']:8.1f} GFLOP/s  "
                  f"{100 * x['share_of_peak']:4.0f}% of measured peak{mfu}")
        print(f"  ours / baseline: {r['speedup']:.2f}x")
    for r in results["packing"]:
        for packing in ("stream", "documents"):
            x = r[packing]
            print(f"{r['config']} {packing:9s} {x['positions_per_s']:10,.0f} positions/s {x['tokens_per_s']:10,.0f} "
                  f"document tokens/s, {100 * x['padding_share']:.1f}% padding")
        print(f"  documents / stream (document tokens/s): {r['documents_over_stream']:.2f}x")
    if results["startup"]:
        for name, seconds in results["startup"].items():
            print(f"process start -> first step done, {name}: {seconds:.1f} s")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
