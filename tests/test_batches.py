"""Samples and their order: stream windows at a seeded offset per epoch, whole documents packed into samples, one
permutation per epoch, batches computed from the step."""

import numpy as np
import pytest
import torch

from stages.lib.tokenizing.batches import (
    IGNORE_INDEX,
    PackedDocuments,
    SampleOrder,
    StreamWindows,
    TrainBatches,
    counted_tokens,
    next_fit,
    validation_batches,
)

SEQ = 16


def stream(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 60000, n).astype(np.uint16), (rng.random(n) > 0.3).astype(np.uint8)


def documents(n_docs=60, seed=0, long_every=9):
    """ids, mask, starts of documents of 1 to 40 tokens, every `long_every`-th one longer than 2 x SEQ."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 40, n_docs)
    lengths[::long_every] = rng.integers(2 * SEQ + 2, 4 * SEQ, len(lengths[::long_every]))
    n = int(lengths.sum())
    ids = rng.integers(0, 60000, n).astype(np.uint16)
    mask = (rng.random(n) > 0.3).astype(np.uint8)
    return ids, mask, np.cumsum(lengths) - lengths


def test_window_inputs_are_the_stream_and_masked_targets_are_minus_100():
    ids, mask = stream()
    windows = StreamWindows(ids, mask, np.array([0]), SEQ)  # validation: offset 0, the last window padded
    assert windows.count == -(-(1000 - 1) // SEQ)
    batch = windows.gather(np.array([3, 0, windows.count - 1]), np.zeros(3, np.int64))
    assert batch.inputs.dtype == batch.labels.dtype == torch.int64 and batch.inputs.shape == (3, SEQ)
    assert batch.positions is None
    for row, w in enumerate([3, 0]):
        a = w * SEQ
        assert batch.inputs[row].tolist() == ids[a:a + SEQ].tolist()
        expected = np.where(mask[a + 1:a + SEQ + 1] == 1, ids[a + 1:a + SEQ + 1].astype(np.int64), IGNORE_INDEX)
        assert batch.labels[row].tolist() == expected.tolist()
    last = (windows.count - 1) * SEQ
    tail = 1000 - 1 - last  # predictions left for the last window
    assert (batch.labels[2, tail:] == IGNORE_INDEX).all()
    assert batch.labels[2, :tail].tolist() == np.where(mask[last + 1:] == 1, ids[last + 1:].astype(np.int64),
                                                       IGNORE_INDEX).tolist()
    assert counted_tokens([batch]) == int((batch.labels != IGNORE_INDEX).sum())


def test_training_windows_move_to_a_seeded_offset_each_epoch():
    ids, mask = stream()
    windows = StreamWindows(ids, mask, np.array([0]), SEQ, seed=5)
    assert windows.count == (1000 - SEQ) // SEQ
    offsets = windows.offsets(np.arange(20))
    assert ((0 <= offsets) & (offsets < SEQ)).all() and len(set(offsets.tolist())) > 5
    assert StreamWindows(ids, mask, np.array([0]), SEQ, seed=5).offsets(np.arange(20)).tolist() == offsets.tolist()
    for epoch in (0, 7):
        # Every window of every epoch is whole, even the last one at the largest offset.
        batch = windows.gather(np.array([0, windows.count - 1]), np.full(2, epoch))
        first = offsets[epoch]
        assert batch.inputs[0].tolist() == ids[first:first + SEQ].tolist()
        assert batch.labels[1, -1] != IGNORE_INDEX or mask[first + windows.count * SEQ] == 0


def test_each_epoch_visits_every_sample_once_in_a_seeded_order():
    order = SampleOrder(samples_per_epoch=50, seed=7)
    (epoch0, e0), (epoch1, e1) = order.samples(0, 50), order.samples(50, 50)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(50))
    assert epoch0.tolist() != epoch1.tolist() and set(e0.tolist()) == {0} and set(e1.tolist()) == {1}
    assert SampleOrder(50, seed=7).samples(0, 100)[0].tolist() == order.samples(0, 100)[0].tolist()
    assert SampleOrder(50, seed=8).samples(0, 50)[0].tolist() != epoch0.tolist()
    # A stretch straddling an epoch boundary takes the end of one order and the start of the next.
    assert order.samples(45, 10)[0].tolist() == epoch0[45:].tolist() + epoch1[:5].tolist()


def test_next_fit_opens_a_bin_exactly_where_the_sequential_rule_does():
    rng = np.random.default_rng(3)
    for capacity in (1, 7, 64):
        sizes = rng.integers(1, capacity + 1, 500)
        expected, used = [0], 0
        for i, size in enumerate(sizes.tolist()):
            if used + size > capacity:
                expected.append(i)
                used = 0
            used += size
        assert next_fit(sizes, capacity).tolist() == expected + [len(sizes)]
    assert next_fit(np.zeros(0, np.int64), 8).tolist() == [0]


def test_packing_places_every_document_once_in_samples_that_start_with_a_document():
    _, mask, starts = documents()
    ids = np.arange(1, len(mask) + 1, dtype=np.uint32)  # token t has id t + 1: an id says where it came from
    lengths = np.diff(np.append(starts, len(ids)))
    packed = PackedDocuments(ids, mask, starts, SEQ, seed=1)
    batch = packed.gather(np.arange(packed.count))
    assert batch.inputs.shape == (packed.count, SEQ)  # no sample is over seq_len
    placed = {}  # document -> [(sample, piece, predictions)]
    for row in range(packed.count):
        inputs, labels, positions = (t[row].numpy().astype(np.int64) for t in (batch.inputs, batch.labels,
                                                                                batch.positions))
        bounds = np.flatnonzero(positions == 0).tolist() + [SEQ]  # position ids restart at each piece
        assert bounds[0] == 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert positions[a:b].tolist() == list(range(b - a))
            if inputs[a] == 0:  # the padding at the end of a sample
                assert b == SEQ and (labels[a:] == IGNORE_INDEX).all()
                continue
            token = inputs[a] - 1
            doc = int(np.searchsorted(starts, token, side="right") - 1)
            offset = int(token - starts[doc])
            assert offset % SEQ == 0  # a document's first token, or the first of a later piece of it
            assert b - a == min(SEQ, lengths[doc] - 1 - offset)
            assert inputs[a:b].tolist() == list(range(inputs[a], inputs[a] + b - a))
            following = np.arange(token + 1, token + 1 + b - a)
            # Each label is the next token of the same document (or -100 where the mask says it does not count).
            assert labels[a:b].tolist() == np.where(mask[following] == 1, following + 1, IGNORE_INDEX).tolist()
            if offset > 0:
                assert a == 0  # a later piece of a long document starts its own sample
            placed.setdefault(doc, []).append((row, offset // SEQ, b - a))
    for doc, length in enumerate(lengths.tolist()):
        if length == 1:
            assert doc not in placed  # a lone EOS predicts nothing
            continue
        pieces = sorted(placed[doc], key=lambda p: p[1])
        assert [k for _, k, _ in pieces] == list(range(-(-(length - 1) // SEQ)))  # each piece exactly once
        assert sum(n for _, _, n in pieces) == length - 1  # every prediction of the document, once
        rows = [row for row, _, _ in pieces]
        assert rows == sorted(set(rows))  # the pieces in order, each in a sample of its own
    facts = packed.facts()
    assert facts["documents_split"] == int((lengths - 1 > SEQ).sum()) > 0
    assert facts["padding_share"] == pytest.approx(1 - (lengths - 1).sum() / (packed.count * SEQ))


def test_packing_follows_the_seed_and_validation_keeps_the_files_order():
    ids, mask, starts = documents()
    first = PackedDocuments(ids, mask, starts, SEQ, seed=1).gather(np.arange(5)).inputs
    assert torch.equal(PackedDocuments(ids, mask, starts, SEQ, seed=1).gather(np.arange(5)).inputs, first)
    assert not torch.equal(PackedDocuments(ids, mask, starts, SEQ, seed=2).gather(np.arange(5)).inputs, first)
    in_order = PackedDocuments(ids, mask, starts, SEQ).gather(np.array([0])).inputs[0]
    assert in_order[:SEQ].tolist() == ids[:SEQ].tolist()  # document 0 is long: its first piece fills sample 0


def make_batches(packing="stream", batch_size=4, grad_accum=1, world_size=1, rank=0, seed=3):
    if packing == "stream":
        ids, mask = stream()
        samples = StreamWindows(ids, mask, np.arange(0, 1000, 37), SEQ, seed=seed)
    else:
        samples = PackedDocuments(*documents(), SEQ, seed=seed)
    return TrainBatches(samples, seed, batch_size, grad_accum, world_size, rank)


def same(a, b):
    return all(torch.equal(x, y) if x is not None else y is None
               for x, y in zip((a.inputs, a.labels, a.positions), (b.inputs, b.labels, b.positions)))


@pytest.mark.parametrize("packing", ["stream", "documents"])
def test_resuming_at_step_k_gives_the_batches_of_running_through(packing):
    through = make_batches(packing)
    count = through.samples.count
    steps = -(-5 * count // 4)  # more than four epochs
    ran = [through.step_batches(step) for step in range(steps)]
    resumed = make_batches(packing)  # a fresh process: nothing replayed
    for step in (steps // 3, steps // 2, steps - 1):
        assert all(same(a, b) for a, b in zip(ran[step], resumed.step_batches(step)))
    cursor = resumed.cursor(steps).as_dict()
    assert cursor["samples_seen"] == steps * 4
    assert (cursor["epoch"], cursor["position_in_epoch"]) == divmod(steps * 4, count)
    assert cursor["documents_per_epoch"] == resumed.samples.documents


def test_the_cursor_counts_documents_begun_in_the_epoch():
    batches = make_batches("documents", batch_size=1)
    count, documents = batches.samples.count, batches.samples.documents
    assert batches.cursor(0).documents_in_epoch == 0
    assert batches.cursor(count - 1).documents_in_epoch < documents
    assert batches.cursor(count).as_dict() | {"samples_seen": 0} == {
        "samples_seen": 0, "epoch": 1, "position_in_epoch": 0, "documents_in_epoch": 0,
        "documents_per_epoch": documents}
    begun = sum(batches.samples.documents_in(np.array([s]))[0] for s in batches.order.permutation(0)[:10])
    assert batches.cursor(10).documents_in_epoch == begun


@pytest.mark.parametrize("packing", ["stream", "documents"])
def test_global_batch_splits_the_same_way_across_micro_steps_and_ranks(packing):
    whole = make_batches(packing, batch_size=8).step_batches(5)[0]
    micro = make_batches(packing, batch_size=4, grad_accum=2).step_batches(5)
    ranks = [make_batches(packing, batch_size=4, world_size=2, rank=r).step_batches(5)[0] for r in (0, 1)]
    for parts in (micro, ranks):
        assert torch.equal(torch.cat([b.inputs for b in parts]), whole.inputs)
        assert torch.equal(torch.cat([b.labels for b in parts]), whole.labels)
        if packing == "documents":
            assert torch.equal(torch.cat([b.positions for b in parts]), whole.positions)


def test_a_far_step_computes_only_its_own_epoch():
    batches = make_batches("documents")
    count = batches.samples.count
    step = 10**9
    batch = batches.micro_batch(step, 0)
    assert batch.inputs.shape == (4, SEQ)
    epoch = step * 4 // count
    assert set(batches.order._perms) <= {epoch, epoch + 1}  # no epoch before it was ever computed
    assert batches.cursor(step).epoch == epoch


def test_validation_batches_are_fixed_and_spread_over_the_split():
    ids, mask = np.arange(1000, dtype=np.uint32), np.ones(1000, np.uint8)  # each id is its own position
    windows = StreamWindows(ids, mask, np.array([0]), SEQ)
    first, again = validation_batches(windows, 12, 4), validation_batches(windows, 12, 4)
    assert len(first) == 3 and all(same(a, b) for a, b in zip(first, again))
    in_threes = validation_batches(windows, 12, 3)  # the same samples, whatever the batch size
    assert len(in_threes) == 4
    assert torch.equal(torch.cat([b.inputs for b in in_threes]), torch.cat([b.inputs for b in first]))
    starts = torch.cat([b.inputs[:, 0] for b in first]).tolist()
    assert starts[0] == 0 and starts[-1] == (windows.count - 1) * SEQ  # from the start to the end of the split
    assert len(set(starts)) == 12
    tiny = StreamWindows(ids[:50], mask[:50], np.array([0]), SEQ)  # 4 windows: fewer than asked for
    assert sum(len(b.inputs) for b in validation_batches(tiny, 12, 4)) == 4


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_gather_reads_memory_mapped_files(tmp_path, dtype):
    ids, mask = stream()
    ids = ids.astype(dtype)
    ids.tofile(tmp_path / "train.bin")
    windows = StreamWindows(np.memmap(tmp_path / "train.bin", dtype=dtype, mode="r"), mask, np.array([0]), SEQ)
    assert windows.gather(np.array([2]), np.zeros(1, np.int64)).inputs[0].tolist() == ids[32:48].tolist()
