"""The tokenize stage's memory does not grow with documents beyond the arrays it must hold: the length figures and
the longest documents are found streaming, and a record larger than tokenize.chunk_mb is encoded in pieces."""

import numpy as np
import pytest

from stages.lib.tokenizing.token_files import DocumentLengths


def argsort_answer(lengths, records, kept=3):
    """What the summary computed before: a stable argsort of every document, one per record."""
    longest = np.argsort(-lengths, kind="stable")
    _, first = np.unique(records[longest], return_index=True)
    longest = longest[np.sort(first)][:kept]
    return [(int(lengths[i]), int(i), int(records[i])) for i in longest]


@pytest.mark.parametrize("seed", range(6))
def test_streaming_top_k_and_figures_equal_the_argsort_answer(seed):
    rng = np.random.default_rng(seed)
    n_records = int(rng.integers(1, 300))
    record_lengths = rng.integers(1, [5, 50, 10_000][seed % 3], n_records)  # many ties when the range is small
    records = np.concatenate([np.arange(n_records), rng.integers(0, n_records, n_records)])  # some repeated
    records = records[rng.permutation(len(records))]
    lengths = record_lengths[records]
    streamed = DocumentLengths()
    cuts = np.sort(rng.integers(0, len(lengths), 8))
    for a, b in zip([0, *cuts], [*cuts, len(lengths)]):
        streamed.add(lengths[a:b], a, records[a:b])
    assert streamed.longest == argsort_answer(lengths, records)
    assert streamed.figures() == {"median": int(np.median(lengths)),
                                  "p99": int(np.percentile(lengths, 99, method="higher")), "max": int(lengths.max())}


def test_lengths_past_int32_are_kept_exactly():
    streamed = DocumentLengths()
    streamed.add(np.array([3, 2**33 + 1, 5], np.int64), 0)
    assert streamed.longest[0] == (2**33 + 1, 1, 1) and streamed.figures()["max"] == 2**33 + 1
