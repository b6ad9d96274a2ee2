"""A weighted mixture of sources becoming the training split (render.sources, render.validation_path).

The render stage reads each source once, in order, the validation source last, and records in stats.json how many
records each one gave ("sources"). The tokenize stage holds out validation documents first (the validation
source, or tokenize.val_ratio of the training documents), then repeats or subsamples each source's training
documents by its weight (`weighted`): weight 2 puts every document in the training split twice, 0.5 a seeded half
of them, 2.5 all twice and a seeded half a third time. So no copy of a validation document is ever trained on. The
tokenizer stage trains a BPE on the training sources only.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages.lib.base.errors import UserError
from stages.lib.tokenizing.records import RECORDS_FILE, STATS_FILE, read_stats


@dataclass(frozen=True)
class SourceSpan:
    """A source as stats.json records it: its records are `records` consecutive lines of records.jsonl."""

    path: str
    weight: float
    validation: bool
    records: int


def document_sources(spans: list[SourceSpan]) -> np.ndarray:
    """The index of the source of each document (documents in records.jsonl order)."""
    return np.repeat(np.arange(len(spans)), [s.records for s in spans])


def validation_split(spans: list[SourceSpan], shuffle: bool, seed: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(training, validation) document indices when a source is the validation set; None when none is."""
    is_validation = np.array([s.validation for s in spans], bool)
    if not is_validation.any():
        return None
    owner = document_sources(spans)
    training = np.flatnonzero(~is_validation[owner])
    if shuffle:
        training = training[np.random.default_rng(seed).permutation(len(training))]
    return training, np.flatnonzero(is_validation[owner])


def weighted(training: np.ndarray, spans: list[SourceSpan], shuffle: bool, seed: int) -> np.ndarray:
    """The training order with each source's documents repeated or subsampled by its weight.

    All weights 1 leave `training` as it is. Otherwise sources follow each other, each as its full copies then its
    seeded subset (documents in the order `training` gives them), and with `shuffle` the whole is shuffled.
    """
    weights = [s.weight for s in spans]
    if all(w == 1 for w in weights):
        return training
    rng = np.random.default_rng((seed, 1))  # its own stream: the split drawn from `seed` stays what it was
    owner = document_sources(spans)[training]
    parts = []
    for i, weight in enumerate(weights):
        docs = training[owner == i]
        whole, fraction = int(weight), weight - int(weight)
        parts += [docs] * whole
        extra = round(fraction * len(docs))
        if extra:
            parts.append(docs[np.sort(rng.choice(len(docs), extra, replace=False))])
    order = np.concatenate(parts) if parts else training[:0]
    return order[rng.permutation(len(order))] if shuffle else order


def read_spans(rendered_dir: Path, n_records: int | None = None) -> list[SourceSpan]:
    """The sources of records.jsonl as the render stage recorded them in stats.json (one source when it did not).

    `n_records`: the number of records in records.jsonl, checked against the sources' counts.
    """
    path = Path(rendered_dir) / STATS_FILE
    stats = read_stats(rendered_dir)
    if stats is not None and not isinstance(stats, dict):
        raise UserError(f"{path} is damaged (it holds {type(stats).__name__}, not an object); rerun the render "
                        "stage (dvc repro -f render)")
    recorded = stats.get("sources") if stats else None
    if not recorded:
        return [SourceSpan("", 1.0, False, n_records or 0)]
    spans = [SourceSpan(s["path"], float(s["weight"]), bool(s["validation"]), int(s["records"])) for s in recorded]
    if n_records is not None and sum(s.records for s in spans) != n_records:
        raise UserError(f"{path} counts {sum(s.records for s in spans)} records from its sources but "
                        f"{path.parent / RECORDS_FILE} holds {n_records}: rerun the render stage")
    return spans
