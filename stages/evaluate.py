"""Evaluate stage: score the exported model on the validation tokens and on held-out prompts.

    python -m stages.evaluate      (dvc repro evaluate)

Reads `models/<train.model_name>/` through `from_pretrained` (so it also proves the export loads), the validation
split of `data/tokens/`, and `evaluate.prompts_path`. Writes to `<train.out_dir>/eval/`:
- `metrics.json`, every value under `eval` (DVC shows `eval.val_loss`, apart from the training logs' `val/loss`):
  `val_loss` (mean loss over the validation tokens that count, mask 1, as in training),
  `perplexity` (exp of val_loss), `val_tokens` (validation tokens read), `val_loss_tokens` (those that counted),
  `exact_match` (share of held-out answers that equal the expected output, both stripped of surrounding
  whitespace; null when there are no prompts) and `n_prompts`; for a preference run (train.objective dpo or orpo)
  with validation pairs, `pref_accuracy` (share of pairs whose chosen answer's reward beats the rejected one's),
  `pref_margin` (their mean reward margin) and `pref_pairs` (stages/lib/training/preference_runs.py).
- `samples.jsonl`: one line per held-out prompt, `{"prompt", "expected", "generated", "correct"}`, where `prompt`
  is the instruction (and its input, after a blank line) as the held-out file gives it.

Validation loss: the validation split is cut into samples the way training cuts it (`train.packing`, see
stages/lib/tokenizing/batches.py): consecutive windows of `train.seq_len` predictions over the token stream (every token
after the first predicted once, with the context its window gives), or whole documents packed with attention kept inside
each (every token of a document after its first predicted once). It is computed like the training loss, through the
chunked head (stages/lib/modeling/loss.py) with no KV cache, so memory does not grow with the vocabulary; samples with
no token that counts are skipped. `evaluate.max_val_tokens` > 0 scores only the first that many tokens. Held-out
answers: greedy decoding from the prompt training used for instruction data (Alpaca, or the chat template when
`render.template` names one), up to `evaluate.max_new_tokens`, stopping at EOS (or an end-of-turn token such as
`<|im_end|>`), prompts batched `evaluate.batch_size` at a time. Instruction and chat data have these; for a model of
plain text only, set `evaluate.prompts_path: ""` (dvc.yaml tracks the folder `data/eval/`, so an empty path needs no
edit there). Scoring a model trained on other data with the bundled sample's prompts says nothing about it: the stage
warns when it does. The same model and data give byte-identical outputs.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from stages.lib.base.errors import UserError, run_stage
from stages.lib.base.files import write_atomically
from stages.lib.base.params import MODELS_DIR, TOKENIZER_DIR, TOKENS_DIR, RenderParams, load_params
from stages.lib.base.progress import bar
from stages.lib.modeling.inference import Decoding, generate_texts, instruction_prompt, instruction_template, load_model
from stages.lib.modeling.loss import make_loss_fn
from stages.lib.tokenizing.batches import IGNORE_INDEX, Batch, Samples, split_samples
from stages.lib.tokenizing.token_files import packing_for, read_meta
from stages.lib.training.preference_runs import preference_metrics

DIGITS = 6  # metrics are rounded so that last-bit float noise does not change the file
LEADING = ("val_loss", "exact_match")
HELDOUT_DIR = Path("data/eval")  # what dvc.yaml tracks for the held-out prompts
SAMPLE_DIR = Path("data/sample")  # the bundled sample data


def main() -> None:
    """Score models/<train.model_name>/ and write <train.out_dir>/eval/."""
    params = load_params()
    p = params.evaluate
    model_dir = MODELS_DIR / params.train.model_name
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} not found: run the train stage first (dvc repro train), which exports the "
                        f"model there (train.model_name = {params.train.model_name!r})")
    model, tokenizer = load_model(model_dir, params.tokenizer.trust_remote_code, params.train.device)
    meta = read_meta(TOKENS_DIR)
    val_samples = split_samples(TOKENS_DIR, "val", params.train.seq_len, packing_for(meta, params.train.packing),
                                seed=None, required=False, max_tokens=p.max_val_tokens, meta=meta)
    metrics = validation_loss(model, val_samples, p.batch_size)
    metrics.update(preference_metrics(model, params.train, TOKENS_DIR, TOKENIZER_DIR,
                                      params.tokenizer.trust_remote_code))
    examples = read_heldout(p.prompts_path, p.num_prompts)
    for warning in heldout_warnings(p.prompts_path, params.render):
        print(f"evaluate: warning: {warning}", file=sys.stderr)
    template = instruction_template(params.render.template)
    samples = answer_heldout(model, tokenizer, examples, p.max_new_tokens, p.batch_size, template)
    metrics.update(score(samples))
    eval_dir = Path(params.train.out_dir) / "eval"
    write_results(eval_dir, metrics, samples)
    print(summary(metrics, eval_dir))


def validation_loss(model, samples: Samples | None, batch_size: int) -> dict:
    """Masked mean loss and perplexity of the model over every validation sample, `batch_size` samples at a time."""
    loss_sum = make_loss_fn(model)
    total, counted = 0.0, 0
    count = samples.count if samples is not None else 0
    for at in bar(range(0, count, batch_size), desc="val loss", unit="batch", leave=False,
                  disable=count <= batch_size):
        chosen = np.arange(at, min(at + batch_size, count))
        batch = scored_rows(samples.gather(chosen, np.zeros(len(chosen), np.int64)))
        if batch is None:
            continue
        batch = batch.to(model.device)
        with torch.inference_mode():
            total += float(loss_sum(batch.inputs, batch.labels, batch.positions))
        counted += batch.counted()
    loss = total / counted if counted else None
    return {"val_loss": _round(loss), "perplexity": _round(math.exp(min(loss, 700)) if counted else None),
            "val_tokens": len(samples.ids) if samples is not None else 0, "val_loss_tokens": counted}


def scored_rows(batch: Batch) -> Batch | None:
    """The rows of `batch` with a token that counts (None when there is none): the others cost a forward pass for
    nothing."""
    keep = (batch.labels != IGNORE_INDEX).any(dim=1)
    if not keep.any():
        return None
    return Batch(*(t[keep] if t is not None else None for t in (batch.inputs, batch.labels, batch.positions)))


def read_heldout(path: str, limit: int = 0) -> list[dict]:
    """Held-out examples (`instruction`, optional `input`, `output`) from a JSONL file; the first `limit` (0: all)."""
    if not path:
        return []
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found: evaluate.prompts_path names the held-out prompts (JSONL with "
                        "instruction, input, output); fix the path, or set it to \"\" to skip answering prompts")
    examples = []
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if limit and len(examples) == limit:
                break
            if line.strip():
                examples.append(_heldout_example(line, f"{path}:{number}"))
    return examples


def heldout_warnings(prompts_path: str, render: RenderParams) -> list[str]:
    """What is doubtful about the held-out prompts: the bundled sample's for a model of other data; untracked."""
    if not prompts_path:
        return []
    path, warnings = Path(prompts_path), []
    if not path.resolve().is_relative_to(HELDOUT_DIR.resolve()):
        warnings.append(f"evaluate.prompts_path = {prompts_path!r} is outside {HELDOUT_DIR}/, the folder dvc.yaml "
                        "tracks for this stage: DVC will not rerun it when that file changes; move the file there")
    if is_sample_heldout(path) and not trains_on_sample(render):
        data = ", ".join(repr(s.path) for s in render.sources) or repr(render.data_path)
        warnings.append(f"{prompts_path} holds the bundled sample's held-out prompts (arithmetic and made-up words), "
                        f"but the model is trained on other data ({data}): its exact match says nothing about "
                        "your data. Point evaluate.prompts_path at held-out prompts of your own (JSONL with "
                        f"instruction, input, output, kept in {HELDOUT_DIR}/), or set it to \"\" to skip them")
    return warnings


def is_sample_heldout(path: Path) -> bool:
    """Whether a held-out file is the bundled sample's: at its place, with the `task` field its records carry."""
    if path.resolve() != (HELDOUT_DIR / "heldout.jsonl").resolve():
        return False
    with open(path, encoding="utf-8-sig") as f:
        first = f.readline()
    try:
        return "task" in json.loads(first)
    except (ValueError, TypeError):
        return False


def trains_on_sample(render: RenderParams) -> bool:
    """Whether the training data includes the bundled sample (data/sample)."""
    sample = SAMPLE_DIR.resolve()
    paths = [s.path for s in render.sources] or [render.data_path]
    return any(sample.is_relative_to(Path(p).resolve()) or Path(p).resolve().is_relative_to(sample) for p in paths)


def _heldout_example(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg}); each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with instruction, input and output")
    record.setdefault("input", "")
    for key in ("instruction", "input", "output"):
        if not isinstance(record.get(key), str):
            raise UserError(f"{where}: '{key}' must be a string, got {record.get(key)!r}; "
                            "each line needs instruction and output (and optionally input)")
    return {key: record[key].replace("\r\n", "\n") for key in ("instruction", "input", "output")}


def answer_heldout(model, tokenizer, examples: list[dict], max_new_tokens: int, batch_size: int,
                   template: str = "alpaca") -> list[dict]:
    """Greedy answers to the held-out examples, batched; one sample dict per example, in the file's order.

    Prompts use `template`, the one instruction data was rendered with for training (see instruction_prompt).
    """
    prompts = [instruction_prompt(e["instruction"], e["input"], template, tokenizer) for e in examples]
    # Batches of similar length waste little on padding; the order is fixed, so results are too.
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i], add_special_tokens=False)
                                                          ["input_ids"]))
    answers = [""] * len(prompts)
    decoding = Decoding(max_new_tokens=max_new_tokens)
    for at in bar(range(0, len(order), batch_size), desc="held-out prompts", unit="batch", leave=False,
                  disable=not order):
        batch = order[at:at + batch_size]
        for i, text in zip(batch, generate_texts(model, tokenizer, [prompts[i] for i in batch], decoding)):
            answers[i] = text
    return [{"prompt": _readable(e), "expected": e["output"], "generated": answer,
             "correct": answer.strip() == e["output"].strip()} for e, answer in zip(examples, answers)]


def _readable(example: dict) -> str:
    return f"{example['instruction']}\n\n{example['input']}" if example["input"].strip() else example["instruction"]


def score(samples: list[dict]) -> dict:
    """Exact-match share (null without samples) and the number of prompts."""
    right = sum(s["correct"] for s in samples)
    return {"exact_match": _round(right / len(samples)) if samples else None, "n_prompts": len(samples)}


def write_results(out_dir: Path, metrics: dict, samples: list[dict]) -> None:
    """Write metrics.json and samples.jsonl, each to a temporary name first so no half-written file remains."""
    # The scores people compare first, first: `dvc exp show` keeps the file's order.
    ordered = {key: metrics[key] for key in LEADING if key in metrics} | metrics
    write_atomically(out_dir / "metrics.json", json.dumps({"eval": ordered}, indent=2) + "\n")
    write_atomically(out_dir / "samples.jsonl", "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples))


def summary(metrics: dict, eval_dir: Path) -> str:
    """One line for the terminal."""
    parts = [f"val_loss {metrics['val_loss']} (perplexity {metrics['perplexity']}) over "
             f"{metrics['val_loss_tokens']:,} tokens"]
    if metrics["n_prompts"]:
        parts.append(f"exact match {metrics['exact_match']:.1%} of {metrics['n_prompts']} held-out prompts")
    return f"evaluate: {'; '.join(parts)}; written to {eval_dir}/"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


if __name__ == "__main__":
    run_stage(main)
