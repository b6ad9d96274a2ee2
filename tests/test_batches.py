"""Token windows and their order: masked labels, one permutation per epoch, batches computed from the step."""

import time

import numpy as np
import pytest
import torch

from stages.lib.batches import IGNORE_INDEX, TokenWindows, TrainBatches, WindowOrder, counted_tokens, validation_batches


def stream(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 60000, n).astype(np.uint16), (rng.random(n) > 0.3).astype(np.uint8)


def test_window_inputs_are_the_stream_and_masked_targets_are_minus_100():
    ids, mask = stream()
    windows = TokenWindows(ids, mask, seq_len=16)
    assert windows.count == (1000 - 1) // 16
    inputs, labels = windows.gather(np.array([3, 0, 61]))
    assert inputs.dtype == labels.dtype == torch.int64 and inputs.shape == labels.shape == (3, 16)
    for row, w in enumerate([3, 0, 61]):
        a = w * 16
        assert inputs[row].tolist() == ids[a:a + 16].tolist()
        expected = np.where(mask[a + 1:a + 17] == 1, ids[a + 1:a + 17].astype(np.int64), IGNORE_INDEX)
        assert labels[row].tolist() == expected.tolist()
    assert counted_tokens([(inputs, labels)]) == int(sum(mask[w * 16 + 1:w * 16 + 17].sum() for w in [3, 0, 61]))


def test_each_epoch_visits_every_window_once_in_a_seeded_order():
    order = WindowOrder(windows_per_epoch=50, seed=7)
    epoch0, epoch1 = order.windows(0, 50), order.windows(50, 50)
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(50))
    assert epoch0.tolist() != epoch1.tolist()
    assert WindowOrder(50, seed=7).windows(0, 100).tolist() == order.windows(0, 100).tolist()
    assert WindowOrder(50, seed=8).windows(0, 50).tolist() != epoch0.tolist()
    # A stretch straddling an epoch boundary takes the end of one order and the start of the next.
    assert order.windows(45, 10).tolist() == epoch0[45:].tolist() + epoch1[:5].tolist()


def make_batches(batch_size=4, grad_accum=1, world_size=1, rank=0, seed=3):
    ids, mask = stream()
    return TrainBatches(TokenWindows(ids, mask, 16), seed, batch_size, grad_accum, world_size, rank)


def test_resuming_at_step_k_gives_the_batches_of_running_through():
    through = make_batches()
    ran = [through.step_batches(step) for step in range(40)]  # 160 samples: more than two epochs of 62 windows
    resumed = make_batches()  # a fresh process: nothing replayed
    for step in (17, 31, 39):
        for (a_in, a_lab), (b_in, b_lab) in zip(ran[step], resumed.step_batches(step)):
            assert torch.equal(a_in, b_in) and torch.equal(a_lab, b_lab)
    assert resumed.cursor(40).as_dict() == {"samples_seen": 160, "epoch": 2, "position_in_epoch": 36}


def test_global_batch_splits_the_same_way_across_micro_steps_and_ranks():
    whole = make_batches(batch_size=8).step_batches(5)[0][0]
    micro = torch.cat([x for x, _ in make_batches(batch_size=4, grad_accum=2).step_batches(5)])
    assert torch.equal(whole, micro)
    ranks = [make_batches(batch_size=4, world_size=2, rank=r).step_batches(5)[0][0] for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), whole)


def test_a_far_step_costs_no_more_than_a_near_one():
    batches = make_batches()
    began = time.perf_counter()
    inputs, _ = batches.micro_batch(10**9, 0)
    assert inputs.shape == (4, 16)
    assert time.perf_counter() - began < 1.0
    assert batches.cursor(10**9).epoch == 10**9 * 4 // 62


def test_validation_batches_are_fixed_and_spread_over_the_split():
    ids, mask = np.arange(1000, dtype=np.uint32), np.ones(1000, np.uint8)  # each id is its own position
    windows = TokenWindows(ids, mask, 16)
    first, again = validation_batches(windows, 4, 3), validation_batches(windows, 4, 3)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    starts = torch.cat([inputs[:, 0] for inputs, _ in first]).tolist()
    assert starts[0] == 0 and starts[-1] == (windows.count - 1) * 16  # from the start to the end of the split
    assert len(set(starts)) == 12
    tiny = TokenWindows(ids[:50], mask[:50], 16)  # 3 windows: fewer than asked for
    assert sum(len(x) for x, _ in validation_batches(tiny, 4, 3)) == 3


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_gather_reads_memory_mapped_files(tmp_path, dtype):
    ids, mask = stream()
    ids = ids.astype(dtype)
    ids.tofile(tmp_path / "train.bin")
    windows = TokenWindows(np.memmap(tmp_path / "train.bin", dtype=dtype, mode="r"), mask, 16)
    assert windows.gather(np.array([2]))[0][0].tolist() == ids[32:48].tolist()
