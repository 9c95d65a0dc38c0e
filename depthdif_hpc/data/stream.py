"""Stream the sharded store to every rank and data-loader worker (never loading it whole).

`ShardStream` is an `IterableDataset` over one split. Which samples a (rank, worker) reads and
in which order it emits them is its `schedule` (`schedule.Schedule`, a pure function of seed,
epoch and sizes: what makes exact mid-epoch resume possible). Each worker reads its samples
shard block by shard block and decodes them (`decode.Decoder`) into the tensors of the batch
contract (`batch.FIELDS`). Two ways to iterate it, same samples in the same order:

* `batched=True` (what `make_dataloader` uses): every item is a whole batch, the next
  `batch_size` samples of the worker's emit sequence, decoded straight from the stored uint16
  codes into the batch tensors: new ones in the main process (pinned when asked and CUDA is
  there), a preallocated shared-memory slot of a `ring.BatchRing` in a DataLoader worker of a
  `StreamLoader` (the main process copies the slot out), else new shared-memory ones. Use it
  with `DataLoader(batch_size=None)`. No per-sample float tensor is built, nothing is stacked.
* `batched=False` (default): every item is one sample (the batch keys without B), for
  `DataLoader(batch_size=N)` with the default collate (evaluate, predict, tests). The batches
  equal the batched ones.

`make_dataloader(cfg, split, rank, world_size)` wraps a batched stream in a `StreamLoader`: a
DataLoader that counts consumed batches and has `state_dict()`, `load_state_dict()`,
`set_epoch()`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import signal
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..normalization import GLOBAL, Normalizer
from .batch import Batch
from .decode import Decoder, Raw
from .ring import BatchRing, RingTicket
from .schedule import Schedule
from .store import (
    META,
    CorruptSampleError,
    ShardReader,
    StoreError,
    read_manifest,
    resolve_normalizer,
    shard_file,
)

log = logging.getLogger(__name__)


class ShardStream(IterableDataset):
    """One split of a store as a resumable, rank/worker-sharded, shuffled sample stream.

    `batched=True` yields whole batches of `batch_size` (see the module docstring; use
    `DataLoader(batch_size=None)`), otherwise single samples. `pin_memory` (batched only)
    allocates the batches in pinned memory when iterated in the main process with CUDA.
    `normalizer`: the temperature z-score of the batches (global by default; make_dataloader
    passes the one dataset.normalization names, predict the model's).
    """

    def __init__(self, store: str | Path, split: str = "train", *, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 7,
                 shuffle_buffer: int = 64, batch_size: int = 1, even_ranks: bool = True,
                 skip_corrupt: bool = False, return_coords: bool = True, batched: bool = False,
                 pin_memory: bool = False, normalizer: Normalizer = GLOBAL):
        super().__init__()
        self.store = Path(store)
        man = read_manifest(self.store)
        if split not in man["splits"]:
            raise StoreError(f"store {self.store} has no split {split!r} ({list(man['splits'])})")
        self.split = split
        self.n = int(man["splits"][split]["n_samples"])
        self.shard = int(man["shard_samples"])
        self.id_offset = int(man["sample_id_offset"][split])
        self.schedule = Schedule(self.n, self.shard, batch_size=batch_size, rank=rank,
                                 world_size=world_size, shuffle=shuffle, seed=seed,
                                 buffer=shuffle_buffer, even_ranks=even_ranks)
        self.decoder = Decoder.from_manifest(man, return_coords, normalizer)
        self.skip_corrupt = skip_corrupt
        self.batched, self.pin_memory = batched, pin_memory
        self.ring: BatchRing | None = None  # set by StreamLoader for its workers
        self.skipped = 0
        # [epoch, consumed batches]; shared memory so persistent DataLoader workers see updates.
        self._pos = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._group = None
        self._fast: dict | None = None
        self._pid = -1

    # ---- position ---------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return int(self._pos[0])

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning (shard order and buffers depend on it)."""
        self._pos[0], self._pos[1] = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        sc = self.schedule
        sd: dict[str, Any] = {"epoch": int(self._pos[0]), "consumed_batches": int(self._pos[1]),
                              "batch_size": sc.batch_size, "seed": sc.seed, "world_size": sc.world_size,
                              "n_samples": self.n, "shard": sc.shard, "shuffle": sc.shuffle,
                              "buffer": sc.buffer, "even_ranks": sc.even_ranks}
        if sc.done is not None and sc.done_epoch == sd["epoch"]:
            # The same on every rank; a bitmask keeps it at n/8 bytes whatever was consumed.
            mask = np.zeros(self.n, bool)
            mask[sc.done] = True
            sd["done_epoch"], sd["done"] = sc.done_epoch, np.packbits(mask).tobytes()
        return sd

    def _check_same(self, state: dict[str, Any], keys: tuple[str, ...]) -> None:
        now = self.state_dict()
        for key in keys:
            if key in state and state[key] != now[key]:
                raise StoreError(f"cannot resume {self.store}:{self.split}: saved {key}={state[key]}, "
                                 f"now {now[key]}")

    def _done_of(self, state: dict[str, Any]) -> np.ndarray | None:
        if "done" not in state or state.get("done_epoch") != state["epoch"]:
            return None
        return np.flatnonzero(np.unpackbits(np.frombuffer(state["done"], np.uint8), count=self.n))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_same(state, ("batch_size", "seed", "world_size", "n_samples", "shard", "shuffle",
                                 "buffer", "even_ranks"))
        done = self._done_of(state)
        self.schedule = replace(self.schedule, done_epoch=int(state["epoch"]) if done is not None else -1,
                                done=done)
        self._pos[0], self._pos[1] = int(state["epoch"]), int(state["consumed_batches"])

    def load_layout_states(self, states: list[dict[str, Any]]) -> None:
        """Continue the epoch that every rank of a run in another layout (world size, batch size
        or loader workers) had reached: `states` are its ranks' `state_dict()`s, in rank order.

        The samples none of them consumed are dealt over this run's ranks and workers as a whole
        epoch's are (with even_ranks, the remainder that does not divide by the world size is
        left out, as at every epoch's end); no consumed sample comes again.
        """
        if not states:
            raise StoreError("cannot resume: no saved stream positions")
        world = len(states)
        epochs = {int(st["epoch"]) for st in states}
        if len(epochs) != 1:
            raise StoreError(f"cannot resume {self.store}:{self.split}: the saved ranks are in different "
                             f"epochs {sorted(epochs)}")
        epoch = epochs.pop()
        for r, st in enumerate(states):
            if st.get("world_size", world) != world:
                raise StoreError(f"cannot resume: saved rank {r} says world_size={st['world_size']}, "
                                 f"{world} ranks were saved")
            self._check_same(st, ("seed", "n_samples", "shard", "shuffle", "buffer", "even_ranks"))
        sc = self.schedule
        done = [self._done_of(states[0])]
        for r, st in enumerate(states):
            old = replace(sc, rank=r, world_size=world, batch_size=int(st["batch_size"]),
                          done_epoch=epoch if done[0] is not None else -1, done=done[0])
            done.append(old.consumed(epoch, int(st.get("num_workers", 0)), int(st["consumed_batches"])))
        every = np.concatenate([d for d in done if d is not None])
        if np.unique(every).size != every.size:
            raise StoreError(f"cannot resume {self.store}:{self.split}: the saved positions overlap "
                             "(they are not the ranks of one run)")
        self.schedule = replace(sc, done_epoch=epoch, done=np.sort(every))
        self._pos[0], self._pos[1] = epoch, 0

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        return self.schedule.rank_samples()

    # ---- reading ----------------------------------------------------------------------------
    def _open(self) -> dict:
        """Per-process readers (opened in each worker, never inherited across a fork)."""
        if self._fast is None or self._pid != os.getpid():
            self._group, self._pid, self._fast = None, os.getpid(), {}
            for name in ("fields", "obs", "meta"):
                try:
                    self._fast[name] = ShardReader(self.store / self.split / name)
                except (OSError, ValueError, KeyError) as exc:  # other layouts: zarr reads them
                    log.debug("zarr path for %s/%s: %s", self.split, name, exc)
        return self._fast

    def _zarr(self):
        # zarr starts an event-loop thread: only touched when the direct reader cannot serve.
        if self._group is None:
            import zarr

            self._group = zarr.open_group(str(self.store), mode="r")[self.split]
        return self._group

    def _name(self, i: int) -> str:
        return (f"store {self.store}, split {self.split}, shard {i // self.shard}, "
                f"sample {i} (sample_id {i + self.id_offset})")

    def _check_files(self, shard: int, a: int, b: int) -> None:
        # A missing shard reads back as fill values without any error in zarr: look first.
        for name, ndim in (("fields", 4), ("obs", 3), ("meta", 2)):
            path = shard_file(self.store, self.split, name, ndim, shard)
            if not path.is_file():
                raise CorruptSampleError(f"store {self.store}, split {self.split}, shard {shard}: "
                                         f"shard file {path} is missing (samples {a}..{b - 1})")

    def _get(self, name: str, a: int, b: int) -> np.ndarray:
        fast = self._open().get(name)
        if fast is not None:
            return fast.read(a, b)
        return self._zarr()[name][a:b]

    def _read_block(self, a: int, b: int) -> dict[int, Raw]:
        """Raw (fields, obs, meta) of samples a..b-1 (one shard), keyed by sample index."""
        shard = a // self.shard
        try:
            self._check_files(shard, a, b)
            fields, obs, meta = (self._get(n, a, b) for n in ("fields", "obs", "meta"))
            bad = np.flatnonzero(meta[:, META["date"]] == 0)
            if bad.size:
                raise CorruptSampleError(f"{self._name(a + int(bad[0]))}: metadata never written")
            return {a + k: (fields[k], obs[k], meta[k]) for k in range(b - a)}
        except CorruptSampleError as exc:
            if not self.skip_corrupt:
                raise
            first_exc: Exception = exc
        except Exception as exc:  # zarr/codec errors: find the sample that fails
            first_exc = exc
        out = {}
        for i in range(a, b):
            try:
                self._check_files(shard, i, i + 1)
                m = self._get("meta", i, i + 1)[0]
                if m[META["date"]] == 0:
                    raise ValueError("metadata never written")
                out[i] = (self._get("fields", i, i + 1)[0], self._get("obs", i, i + 1)[0], m)
            except Exception as exc:
                err = exc if isinstance(exc, CorruptSampleError) else CorruptSampleError(
                    f"{self._name(i)}: cannot read ({type(exc).__name__}: {exc})")
                if not self.skip_corrupt:
                    raise err from exc
                self.skipped += 1
                log.warning("skipping corrupt sample (%d skipped so far in this worker): %s",
                            self.skipped, err)
        if not out and not self.skip_corrupt:
            raise CorruptSampleError(f"{self._name(a)}: {first_exc}") from first_exc
        return out

    def _raw_items(self, read_seq: np.ndarray, emit: np.ndarray) -> Iterator[tuple[int, Raw | None]]:
        """(sample index, raw (fields, obs, meta) or None if skipped as corrupt) in emit order.

        Reads the read sequence block by block (runs inside one shard, one read each) and keeps
        each sample's raw codes (views into the block) until its turn comes.
        """
        want = set(emit.tolist())
        pos_of = {int(s): p for p, s in enumerate(read_seq)}
        cuts = np.flatnonzero((np.diff(read_seq) != 1)
                              | (read_seq[1:] // self.shard != read_seq[:-1] // self.shard)) + 1
        blocks = np.split(np.arange(read_seq.size), cuts)
        block_of = np.empty(read_seq.size, np.int64)
        for bi, blk in enumerate(blocks):
            block_of[blk] = bi
        cache: dict[int, Raw] = {}
        loaded = -1
        for i in emit.tolist():
            need = block_of[pos_of[i]]
            while loaded < need:
                loaded += 1
                blk = read_seq[blocks[loaded]]
                if not any(int(s) in want for s in blk):
                    continue  # everything in it was consumed before the resume
                for j, raw in self._read_block(int(blk[0]), int(blk[-1]) + 1).items():
                    if j in want:
                        cache[j] = raw
            want.discard(i)
            yield i, cache.pop(i, None)

    def __iter__(self) -> Iterator[Batch | RingTicket]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, consumed = int(self._pos[0]), int(self._pos[1])
        read_seq, emit = self.schedule.worker(epoch, worker, workers, consumed)
        in_process = info is None
        items = self._raw_items(read_seq, emit) if emit.size else iter(())
        bs, dec = self.schedule.batch_size, self.decoder
        if self.batched:
            # Batch k of this worker = emit[k * bs:(k + 1) * bs] (the schedule's own cut), so a
            # resumed worker, whose emit sequence starts at a batch boundary, cuts the same.
            where = ("shared" if not in_process else
                     "pinned" if self.pin_memory and torch.cuda.is_available() else "plain")
            ring = self.ring if not in_process and self.ring is not None else None
            if ring is not None:
                if ring.workers != workers or ring.batch_size < bs:
                    raise RuntimeError(f"BatchRing for {ring.workers} workers x {ring.batch_size}"
                                       f" samples, loader has {workers} x {bs}")
                ring.reset(worker)
            for _ in range(math.ceil(emit.size / bs)):
                chunk = [(i, raw) for i, raw in itertools.islice(items, bs) if raw is not None]
                if in_process:
                    self._pos[1] += 1
                if not chunk:  # only when every sample of the batch was skipped as corrupt
                    continue
                ids = [i + self.id_offset for i, _ in chunk]
                raws = [raw for _, raw in chunk]
                if ring is None:
                    yield dec.decode_batch(ids, raws, where)
                    continue
                slot = ring.acquire(worker)
                if slot is None:
                    log.debug("worker %d: no free ring slot, sending the batch itself", worker)
                    yield dec.decode_batch(ids, raws, "shared")
                    continue
                try:
                    dec.decode_batch(ids, raws, out=ring.slot(worker, slot, len(chunk)))
                except BaseException:
                    ring.release(worker, slot)
                    raise
                yield RingTicket(ring.token, worker, slot, len(chunk))
        else:
            for i, raw in items:
                if raw is None:  # skipped as corrupt
                    continue
                item = dec.decode(i + self.id_offset, *raw)
                if in_process:  # in-process iteration tracks its own position (batch_size 1)
                    self._pos[1] += 1 if bs == 1 else 0
                yield item
        if in_process:
            self._pos[0], self._pos[1] = epoch + 1, 0


# What SLURM and the launchers send to stop a job at a step boundary (the trainer's StopSignals).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def ignore_stop_signals(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn
    """Loader workers leave the stop signals to the trainer.

    SLURM signals every process of the step, workers included. A forked worker inherits the
    trainer's handler (harmless: it sets a flag nobody reads), but a spawn or forkserver worker
    starts with the default actions, so SIGTERM would kill it and the trainer's checkpoint-and-stop
    would fail on a dead worker instead.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# Loaders whose workers may still run. A worker ignores SIGTERM, and the interpreter's exit stops
# daemonic children (DataLoader workers) with SIGTERM and then waits for them: a loader with
# persistent workers still referenced at exit would hang the exit forever. `_close_loaders` runs
# first (atexit is last-in, first-out; multiprocessing registers its hook at import) and stops
# them the DataLoader's way, by a sentinel on their queues.
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_loaders() -> None:
    for loader in list(_LIVE):
        loader.close()


class StreamLoader:
    """DataLoader over a ShardStream that knows its position: resumable mid-epoch.

    Iterating runs the current epoch from the first unconsumed batch; finishing it advances
    to the next epoch. `state_dict()` after k batches, loaded into a fresh loader with the
    same store/world/batch/worker settings, yields exactly the remaining batches.

    A batched stream (`ShardStream(batched=True)`, what make_dataloader builds) runs under
    `DataLoader(batch_size=None)`: every item is a finished batch. Without workers the
    stream decodes into new batch tensors (pinned when `pin_memory` and CUDA: no pin copy).
    With workers (and `ring`, the default) they hand batches over through a `BatchRing` of
    prefetch_factor + 1 slots per worker, allocated once per set of workers
    (workers x slots x batch_size x 8.3 MB at 128 x 128 x 50); the batch handed out is a copy
    of the slot, made by the DataLoader's pin thread straight into pinned memory with
    pin_memory, else by this iterator. `ring=False`: workers send their batch tensors through
    torch's shared memory instead. A per-sample stream gets the default collate.
    """

    def __init__(self, dataset: ShardStream, *, num_workers: int = 0, pin_memory: bool = False,
                 persistent_workers: bool = False, prefetch_factor: int | None = 2,
                 multiprocessing_context: str | None = None, ring: bool = True):
        self.dataset = dataset
        self.num_workers = num_workers
        # The DataLoader draws its workers' base seed from this generator when it starts them,
        # else from torch's global one: starting workers would then move the trainer's RNG
        # state, by a number of draws that differs between a run and its resume.
        self._generator = torch.Generator()
        kw: dict[str, Any] = {"generator": self._generator}
        if num_workers > 0:
            kw |= {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor,
                   "multiprocessing_context": multiprocessing_context,
                   "worker_init_fn": ignore_stop_signals}
        self.use_ring = dataset.batched and num_workers > 0 and ring
        self.pin_memory = pin_memory
        if dataset.batched:
            dataset.pin_memory = pin_memory and num_workers == 0
            self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                     pin_memory=pin_memory and num_workers > 0, **kw)
        else:
            self.loader = DataLoader(dataset, batch_size=dataset.schedule.batch_size,
                                     num_workers=num_workers, pin_memory=pin_memory, **kw)
        self._ring_slots = (prefetch_factor or 2) + 1
        if num_workers > 0:
            _LIVE.add(self)
        self._ring_busy = False  # an iteration (and its workers) may still use dataset.ring
        self._consumed = int(dataset._pos[1])

    def close(self) -> None:
        """Stop the persistent workers now (they otherwise live as long as the loader)."""
        it = getattr(self.loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
            self.loader._iterator = None

    def _ring(self) -> BatchRing:
        """The ring of the workers this iteration runs on (created before they start)."""
        ds = self.dataset
        if ds.ring is None or (self._ring_busy and not self.loader.persistent_workers):
            # Persistent workers keep the ring they started with; fresh workers reuse the last
            # one unless an unfinished iteration's workers may still write into it.
            ctx = self.loader.multiprocessing_context or torch.multiprocessing
            ds.ring = BatchRing(self.num_workers, self._ring_slots, ds.schedule.batch_size,
                                ds.decoder.batch_specs(), ctx.Lock())
        return ds.ring

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.dataset.schedule.rank_batches()

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._consumed = 0

    def state_dict(self) -> dict[str, Any]:
        sd = self.dataset.state_dict()
        sd["consumed_batches"] = self._consumed
        sd["num_workers"] = self.num_workers
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "num_workers" in state and state["num_workers"] != self.num_workers:
            raise StoreError(f"cannot resume: saved with num_workers={state['num_workers']}, "
                             f"now {self.num_workers} (the per-worker schedules differ; "
                             "load_layout_states continues in a new layout)")
        self.dataset.load_state_dict(state)
        self._consumed = int(state["consumed_batches"])

    def load_layout_states(self, states: list[dict[str, Any]]) -> None:
        """Continue the epoch of a run saved in another layout (`ShardStream.load_layout_states`)."""
        self.dataset.load_layout_states(states)
        self._consumed = 0

    def __iter__(self) -> Iterator[Batch]:
        ds = self.dataset
        ds._pos[1] = self._consumed  # workers read this when they (re)start their iterator
        epoch = ds.epoch
        ring = self._ring() if self.use_ring else None
        self._ring_busy = ring is not None
        sc = ds.schedule
        self._generator.manual_seed(int(np.random.SeedSequence([sc.seed, epoch, sc.rank]).generate_state(1)[0]))
        it = iter(self.loader)
        try:
            for batch in it:
                if isinstance(batch, RingTicket):  # (with pin_memory the pin thread redeemed it)
                    batch = ring.take(batch)
                self._consumed += 1
                yield batch
        finally:
            del it  # non-persistent workers stop here, before the ring counts as free
            self._ring_busy = False
        ds._pos[0], ds._pos[1] = epoch + 1, 0
        self._consumed = 0


def make_dataloader(cfg: Any, split: str = "train", rank: int = 0, world_size: int = 1, *,
                    store: str | Path | None = None, batch_size: int | None = None,
                    num_workers: int | None = None, shuffle: bool | None = None,
                    epoch: int = 0) -> StreamLoader:
    """A StreamLoader for `split` ("train" | "val") of `store` (default cfg.dataset.store).

    Batch size, workers and shuffle come from cfg.dataloader (val_* for the val split) unless
    given; the seed is cfg.dataset.random_seed, the buffer cfg.dataloader.shuffle_buffer. The
    stream is batched: each worker decodes whole batches straight into the batch tensors.
    """
    store = store or cfg.dataset.store
    if not store:
        raise StoreError("no store given: set dataset.store (build one with "
                         "python -m depthdif_hpc.data.build)")
    d = cfg.dataloader
    train = split == "train"
    bs = batch_size or (d.batch_size if train else d.val_batch_size)
    nw = num_workers if num_workers is not None else (d.num_workers if train else d.val_num_workers)
    sh = shuffle if shuffle is not None else (d.shuffle if train else d.val_shuffle)
    ds = ShardStream(store, split, rank=rank, world_size=world_size, shuffle=sh,
                     seed=cfg.dataset.random_seed, shuffle_buffer=d.shuffle_buffer, batch_size=bs,
                     even_ranks=d.even_ranks, skip_corrupt=cfg.dataset.skip_corrupt_samples,
                     return_coords=cfg.dataset.return_coords, batched=True,
                     normalizer=resolve_normalizer(cfg))
    ds.set_epoch(epoch)
    return StreamLoader(ds, num_workers=nw, pin_memory=d.pin_memory and torch.cuda.is_available(),
                        persistent_workers=d.persistent_workers if train else False,
                        prefetch_factor=d.prefetch_factor)
