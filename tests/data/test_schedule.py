"""The sample schedule: a pure function of sizes, seed and epoch (no store needed)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from depthdif_hpc.data.schedule import Schedule, buffered_order, consumed_per_worker


def test_schedule_helpers():
    rng = np.random.default_rng(0)
    order = buffered_order(100, 8, rng)
    assert sorted(order.tolist()) == list(range(100))
    assert np.all(order[:92] < np.arange(92) + 8)  # emitted at most `buffer` after being read
    assert buffered_order(5, 8, None).tolist() == [0, 1, 2, 3, 4]
    # 3 workers with 1, 3, 2 batches: round robin skipping exhausted workers.
    assert consumed_per_worker(4, [1, 3, 2]) == ([1, 2, 1], 2)
    assert consumed_per_worker(5, [1, 3, 2]) == ([1, 2, 2], 1)
    assert consumed_per_worker(6, [1, 3, 2])[0] == [1, 3, 2]


@pytest.mark.parametrize(("n", "world", "even"), [(0, 1, True), (17, 1, True), (17, 3, True),
                                                  (17, 3, False), (2, 3, False), (2, 3, True)])
def test_ranks_and_workers_partition_each_epoch(n, world, even):
    """Ranks read disjoint samples (all of them without even_ranks, equal counts with it);
    workers cut their rank's range into whole batches; the counts need no sequence built."""
    for epoch, workers in itertools.product((0, 1), (1, 2, 3)):
        seen = []
        for rank in range(world):
            sc = Schedule(n, 4, batch_size=2, rank=rank, world_size=world, seed=3,
                          buffer=5, even_ranks=even)
            rank_seq = sc.rank_range(epoch)
            assert rank_seq.size == sc.rank_samples()
            pieces = sc.worker_ranges(epoch, workers)
            assert np.array_equal(np.concatenate(pieces), rank_seq)
            nonempty = [p for p in pieces if p.size]
            assert all(p.size % 2 == 0 for p in nonempty[:-1])
            assert sum(-(-p.size // 2) for p in pieces) == sc.rank_batches()
            for w in range(workers):
                read, emit = sc.worker(epoch, w, workers)
                assert np.array_equal(read, pieces[w]) and sorted(emit) == sorted(read)
            seen.extend(rank_seq.tolist())
        assert len(seen) == len(set(seen))
        assert len(seen) == (n // world * world if even else n)


def test_resumed_worker_emits_the_rest_of_its_sequence():
    sc = Schedule(23, 4, batch_size=2, world_size=1, seed=5, buffer=6)
    full = [sc.worker(2, w, 3)[1] for w in range(3)]
    assert sc.worker(2, 0, 3)[1].tolist() != sc.worker(3, 0, 3)[1].tolist()  # per-epoch order
    # After 4 batches (round robin: workers 0, 1, 2, 0) worker 1 is next: it becomes slot 0.
    read, emit = sc.worker(2, 0, 3, consumed_batches=4)
    assert emit.tolist() == full[1][2:].tolist()
    read, emit = sc.worker(2, 2, 3, consumed_batches=4)
    assert emit.tolist() == full[0][4:].tolist()


def test_schedule_refuses_bad_sizes():
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Schedule(10, 4, batch_size=0)
    with pytest.raises(ValueError, match=r"rank 2 not in \[0, world_size=2\)"):
        Schedule(10, 4, rank=2, world_size=2)
