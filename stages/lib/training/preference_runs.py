"""A preference run (train.objective dpo or orpo): its samples, whole pairs (stages/lib/tokenizing/pairs.py), with the
reference scores when they were computed beforehand, what joins the run's fingerprint, and the evaluate stage's
preference accuracy and margin on the validation pairs."""

from pathlib import Path

import numpy as np

from stages.lib.base.params import TrainParams
from stages.lib.checkpointing.hashing import model_digest
from stages.lib.modeling.families import build_model
from stages.lib.modeling.preference_loss import pair_scores
from stages.lib.tokenizing.loading import tokenizer_facts
from stages.lib.tokenizing.pairs import PreferencePairs, pair_samples, read_reference
from stages.lib.tokenizing.token_files import read_meta


def reference_dir(tokens_dir: Path) -> Path:
    """Where the reference stage writes its scores: data/reference beside data/tokens."""
    return Path(tokens_dir).parent / "reference"


def uses_precomputed_reference(train: TrainParams) -> bool:
    """Whether the run reads the reference stage's scores."""
    return train.objective == "dpo" and train.reference == "precomputed"


def reference_facts(train: TrainParams, meta: dict) -> dict:
    """What the reference scores depend on, and nothing else: the pairs, train.seq_len (it cuts them) and the
    reference model's files."""
    return {"pairs_sha256": {split: entry["sha256"] for split, entry in (meta.get("pairs") or {}).items()},
            "seq_len": train.seq_len, "reference_model_sha256": model_digest(train.init_from)}


def preference_samples(train: TrainParams, tokens_dir: Path) -> tuple[PreferencePairs, PreferencePairs | None]:
    """The training and validation pairs, each with its reference scores when the run reads them."""
    scores = {}
    if uses_precomputed_reference(train):
        expected = reference_facts(train, read_meta(tokens_dir))
        scores = {split: read_reference(reference_dir(tokens_dir), split, expected)
                  for split in expected["pairs_sha256"]}
    return (pair_samples(tokens_dir, "train", train.seq_len, True, scores.get("train")),
            pair_samples(tokens_dir, "val", train.seq_len, False, scores.get("val")))


def preference_metrics(model, train: TrainParams, tokens_dir: Path, tokenizer_dir: Path,
                       trust_remote_code: bool = False) -> dict:
    """The validation pairs under `model` (an export), with the rewards the run's objective trains: the share whose
    chosen answer's reward beats the rejected one's (pref_accuracy) and the mean margin between them (pref_margin).
    Nothing for an SFT run or without validation pairs."""
    samples = pair_samples(tokens_dir, "val", train.seq_len, False) if train.objective != "sft" else None
    if samples is None:
        return {}
    scores = pair_scores(model, samples)
    if train.objective == "orpo":
        rewards = train.beta * scores[:, :, 0] / np.maximum(scores[:, :, 1], 1)
    else:
        reference = _reference_scores(train, samples, tokens_dir, tokenizer_dir, trust_remote_code, model.device)
        rewards = train.beta * (scores[:, :, 0] - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    return {"pref_accuracy": round(float((margin > 0).mean()), 6), "pref_margin": round(float(margin.mean()), 6),
            "pref_pairs": len(margin)}


def _reference_scores(train: TrainParams, samples: PreferencePairs, tokens_dir: Path, tokenizer_dir: Path,
                      trust_remote_code: bool, device) -> np.ndarray:
    """The validation pairs' reference scores: the reference stage's, or (adapters_off) the base's, scored now."""
    if uses_precomputed_reference(train):
        return read_reference(reference_dir(tokens_dir), "val", reference_facts(train, read_meta(tokens_dir)))
    vocab_size, special_ids = tokenizer_facts(tokenizer_dir, trust_remote_code, read_meta(tokens_dir))
    return pair_scores(build_model(train, vocab_size, special_ids).to(device).eval(), samples)[:, :, 0]
