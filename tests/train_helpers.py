"""A tiny, self-contained training workspace for the train-stage tests: token files, a tokenizer, params.yaml."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from conftest import save_tokenizer, write_token_files

from stages.lib.base.params import TrainParams, parse_params

REPO = Path(__file__).resolve().parents[1]
# Tiny models run fastest on one thread (two OpenMP threads stall badly on a busy machine), and sessions compared
# bit for bit must use the same thread count in this process and in the stage processes (see stage_env).
THREADS = 1
VOCAB = 64
EOS_ID, PAD_ID = 0, 1

# 2 layers, 32 wide, context 16: a step takes milliseconds on a CPU.
TINY = {
    "model_name": "tiny", "model": {"n_layer": 2, "hidden_size": 32, "n_head": 4, "max_position_embeddings": 32},
    "seq_len": 16, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
    "total_step_budget": 12, "save_every": 4, "eval_every": 4, "eval_batches": 2, "device": "cpu",
}


def make_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over `<eos>`, `<pad>` and t2..t63, saved as a HuggingFace folder."""
    save_tokenizer(folder, eos="<eos>", pad="<pad>", vocab_size=VOCAB)


def make_tokens(folder: Path, train_tokens: int = 2000, val_tokens: int = 300, seed: int = 0,
                prompts: bool = False) -> None:
    """Token files of documents of a learnable pattern, a quarter of each one's targets masked; `prompts`: the
    documents count as instruction data (so `train.packing: auto` packs whole documents)."""
    rng = np.random.default_rng(seed)
    splits = {split: _documents(rng, n) for split, n in (("train", train_tokens), ("val", val_tokens))}
    write_token_files(folder, splits, VOCAB, EOS_ID, folder.parent / "tokenizer" / "tokenizer.json", prompts=prompts)


def _documents(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents (ids with their EOS, mask) of `n` tokens in all, the last one cut short."""
    docs, total = [], 0
    while total < n:
        length = int(rng.integers(8, 40))
        start, stride = int(rng.integers(2, VOCAB)), int(rng.integers(1, 4))
        doc = (start + stride * np.arange(length) - 2) % (VOCAB - 2) + 2
        keep = min(length + 1, n - total)
        docs.append((np.append(doc, EOS_ID)[:keep], np.append(rng.random(length) > 0.25, True)[:keep]))
        total += keep
    return docs


def make_workspace(root: Path, prompts: bool = False, **train_overrides) -> Path:
    """data/tokenizer, data/tokens (of instruction data when `prompts`, else plain text) and params.yaml (TINY plus
    overrides) under `root`; returns root."""
    make_tokenizer(root / "data" / "tokenizer")
    make_tokens(root / "data" / "tokens", prompts=prompts)
    write_params(root, **train_overrides)
    return root


def write_params(root: Path, **train_overrides) -> None:
    """params.yaml holding TINY with the given train.* overrides."""
    (root / "params.yaml").write_text(yaml.safe_dump({"train": {**TINY, **train_overrides}}))


def tiny_params(**train_overrides) -> TrainParams:
    """TrainParams for in-process sessions: TINY with overrides."""
    return parse_params({"train": {**TINY, **train_overrides}}).train


def stage_command(script: str | None = None) -> list[str]:
    """The command that runs the stage (or a given Python snippet) as users do, in a fresh process."""
    return [sys.executable, "-c", script] if script else [sys.executable, "-m", "stages.train"]


def stage_env() -> dict:
    """Environment for a stage process run from a test workspace: the repository importable, no GPU."""
    return {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "DVC_STUDIO_OFFLINE": "1",
            "OMP_NUM_THREADS": str(THREADS)}


def run_stage(root: Path, script: str | None = None, **train_overrides) -> subprocess.CompletedProcess:
    """Run one session in a fresh process in `root`, after writing params.yaml with the overrides."""
    write_params(root, **train_overrides)
    return subprocess.run(stage_command(script), cwd=root, env=stage_env(), capture_output=True, text=True,
                          timeout=120)


def read_tsv(root: Path, metric: str, out_dir: str = "outputs") -> list[tuple[int, str]]:
    """(step, value) rows of one DVCLive metric log."""
    path = root / out_dir / "live" / "plots" / "metrics" / f"{metric}.tsv"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()[1:]
    return [(int(line.split("\t")[0]), line.split("\t")[1]) for line in lines]


LONG_RUN = {"total_step_budget": 100_000, "save_every": 100_000, "eval_every": 100_000}  # a session to interrupt


def wait_for_steps(root: Path, process: subprocess.Popen, steps: int) -> None:
    """Wait (90 s at most) until the session `process` runs in `root` has logged `steps` training steps."""
    deadline = time.monotonic() + 90
    while len(read_tsv(root, "train/loss")) < steps and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert len(read_tsv(root, "train/loss")) >= steps, process.communicate()[1] if process.poll() is not None else ""


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes), to compare outputs byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def inside(folder: Path):
    """Run the enclosed code with `folder` as the working directory (stages use paths relative to the repo root)."""
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(before)


def session(root: Path, train: TrainParams | None = None, **train_overrides):
    """One in-process session in workspace `root` with `train`, or TINY plus overrides; returns its SessionResult."""
    from stages.lib.training.trainer import run_session
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        with inside(root):
            return run_session(train or tiny_params(**train_overrides))
    finally:
        torch.set_num_threads(threads)


def checkpoint_step(root: Path, checkpoint_dir: str = "checkpoints") -> int:
    """The step of the one checkpoint in the workspace's checkpoint folder."""
    folders = sorted((root / checkpoint_dir).glob("step-*"))
    assert len(folders) == 1, f"expected one checkpoint, found {folders}"
    return json.loads((folders[0] / "state.json").read_text())["step"]
