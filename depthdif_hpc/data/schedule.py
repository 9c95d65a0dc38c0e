"""Which samples every rank and DataLoader worker reads, and in which order it emits them.

Per epoch the shards are permuted (seed, epoch); the resulting sample sequence is cut into one
contiguous range per rank (equal lengths with `even_ranks`, the remainder dropped) and each
rank's range into one per worker (whole batches), so every (rank, worker) reads its own
shards (a range boundary may split one shard between two neighbours; they read disjoint
samples of it). A worker emits its range through a bounded shuffle buffer seeded by (seed,
epoch, rank, worker). Everything here is a pure function of the sizes, the seed and the epoch:
that is what makes exact mid-epoch resume possible, since a restarted worker replays the
schedule without reading data and starts at the first batch not yet consumed.

The same replay tells which samples a run at another world size (or worker count) consumed
before it stopped (`Schedule.consumed`). A resume in a new layout continues that epoch with
`done` set to those samples: the epoch's sequence without them is cut over the new ranks and
workers exactly as a whole epoch would be, and the next epoch is a whole one again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def buffered_order(n: int, buffer: int, rng: np.random.Generator | None) -> np.ndarray:
    """Output order (positions 0..n-1) of a bounded shuffle buffer fed positions in order.

    An item is emitted at most `buffer` places after it was read, which bounds memory.
    Without rng (no shuffle) the order is the identity.
    """
    if rng is None or n <= 1 or buffer <= 1:
        return np.arange(n)
    out = np.empty(n, np.int64)
    buf = list(range(min(buffer, n)))
    nxt, k = len(buf), 0
    while nxt < n:
        j = int(rng.integers(len(buf)))
        out[k], buf[j] = buf[j], nxt
        k += 1
        nxt += 1
    tail = rng.permutation(len(buf))
    out[k:] = np.asarray(buf)[tail]
    return out


def consumed_per_worker(batches: int, nb: list[int]) -> tuple[list[int], int]:
    """Batches taken from each worker after `batches` were consumed, and the worker next in turn.

    The DataLoader returns worker batches round-robin, skipping exhausted workers (in-order
    mode). A fresh DataLoader starts its cycle at worker 0, so on resume the workers are
    renumbered to start the cycle at the worker that was next in turn.
    """
    got = [0] * len(nb)
    k, w = batches, 0
    while k > 0 and any(g < n for g, n in zip(got, nb, strict=True)):
        if got[w] < nb[w]:
            got[w] += 1
            k -= 1
        w = (w + 1) % len(nb)
    for _ in range(len(nb)):  # point at a worker that still has batches
        if got[w] < nb[w]:
            break
        w = (w + 1) % len(nb)
    return got, w


@dataclass(frozen=True)
class Schedule:
    """The sample schedule of one rank over a split of `n` samples in shards of `shard`."""

    n: int
    shard: int
    batch_size: int = 1
    rank: int = 0
    world_size: int = 1
    shuffle: bool = True
    seed: int = 7
    buffer: int = 64  # shuffle buffer, samples
    even_ranks: bool = True
    # Samples of epoch `done_epoch` consumed before this layout took over (sorted indices):
    # that epoch deals out only the others. None: every epoch is whole.
    done_epoch: int = -1
    done: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, world_size={self.world_size})")

    def _left(self, epoch: int | None) -> int:
        """Samples of `epoch` to deal out (all n, unless part of it was consumed elsewhere)."""
        if epoch is not None and epoch == self.done_epoch and self.done is not None:
            return self.n - int(self.done.size)
        return self.n

    def rank_samples(self, epoch: int | None = None) -> int:
        """Samples this rank gets in `epoch` (None: in a whole epoch, the same every epoch)."""
        n = self._left(epoch)
        if self.even_ranks:
            return n // self.world_size
        return n // self.world_size + (self.rank < n % self.world_size)  # array_split

    def rank_batches(self, epoch: int | None = None) -> int:
        """Batches this rank yields in `epoch`, over all its workers (only the last is partial)."""
        return math.ceil(self.rank_samples(epoch) / self.batch_size)

    def epoch_sequence(self, epoch: int) -> np.ndarray:
        """All samples of `epoch` still to be dealt out, in read order (shards permuted)."""
        n_shards = math.ceil(self.n / self.shard)
        order = np.arange(n_shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n_shards)
        seq = np.concatenate([np.arange(s * self.shard, min((s + 1) * self.shard, self.n))
                              for s in order]) if self.n else np.zeros(0, np.int64)
        if self._left(epoch) != self.n:
            seq = seq[~np.isin(seq, self.done)]
        return seq

    def rank_range(self, epoch: int) -> np.ndarray:
        """This rank's samples of `epoch`, in read order."""
        seq = self.epoch_sequence(epoch)
        if self.even_ranks:
            per = seq.size // self.world_size
            return seq[self.rank * per:(self.rank + 1) * per]
        return np.array_split(seq, self.world_size)[self.rank]

    def worker_ranges(self, epoch: int, workers: int) -> list[np.ndarray]:
        """The rank range cut into contiguous pieces of whole batches, one per worker (the last
        non-empty piece may end in a partial batch)."""
        rank_seq = self.rank_range(epoch)
        nb = math.ceil(rank_seq.size / self.batch_size)
        out, start = [], 0
        for w in range(workers):
            b = nb // workers + (w < nb % workers)
            out.append(rank_seq[start:start + b * self.batch_size])
            start += b * self.batch_size
        return out

    def worker(self, epoch: int, worker: int, workers: int, consumed_batches: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        """(read sequence, remaining emit sequence) of DataLoader worker `worker` of `workers`
        after the loader handed out `consumed_batches` batches of `epoch`.

        Batch k of the worker is emit[k * batch_size:(k + 1) * batch_size]; the remaining emit
        sequence starts at a batch boundary, so a resumed worker cuts the same batches.
        """
        pieces = self.worker_ranges(epoch, workers)
        nb = [math.ceil(p.size / self.batch_size) for p in pieces]
        got, first = consumed_per_worker(consumed_batches, nb)
        worker = (worker + first) % workers  # DataLoader worker id -> schedule slot
        skip = got[worker] * self.batch_size
        piece = pieces[worker]
        order = buffered_order(piece.size, self.buffer, self._worker_rng(epoch, worker, workers))
        return piece, piece[order[skip:]]

    def _worker_rng(self, epoch: int, slot: int, workers: int) -> np.random.Generator | None:
        return (np.random.default_rng([self.seed, epoch, self.rank, slot, workers])
                if self.shuffle else None)

    def consumed(self, epoch: int, workers: int, consumed_batches: int) -> np.ndarray:
        """The samples this rank emitted in the first `consumed_batches` batches of `epoch`,
        read by `workers` loader workers (0 or 1: in-process), sorted."""
        workers = max(1, workers)
        pieces = self.worker_ranges(epoch, workers)
        nb = [math.ceil(p.size / self.batch_size) for p in pieces]
        got, _ = consumed_per_worker(consumed_batches, nb)
        out = [p[buffered_order(p.size, self.buffer, self._worker_rng(epoch, s, workers))[:g * self.batch_size]]
               for s, (p, g) in enumerate(zip(pieces, got, strict=True))]
        return np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
