"""Stream the sharded store to every rank and data-loader worker (never loading it whole).

`ShardStream` is an `IterableDataset` over one split. For each epoch it permutes the shards
(seed, epoch), cuts the resulting sample sequence into one contiguous range per rank (equal
lengths with `even_ranks`) and each rank's range into one per worker (whole batches), so every
(rank, worker) reads its own shards (a range boundary may split one shard between two
neighbours; they read disjoint samples of it). Each worker reads its shards in order, block by
block, and emits through a bounded shuffle buffer seeded by (seed, epoch, rank, worker). The
whole schedule is a pure function of (seed, epoch, sizes), which is what makes exact mid-epoch
resume possible: a restarted worker replays the index schedule without reading data and starts
at the first batch not yet consumed.

Two ways to iterate it, same samples in the same order:

* `batched=True` (what `make_dataloader` uses): every item is a whole batch, the next
  `batch_size` samples of the worker's emit sequence, decoded straight from the stored uint16
  codes into the batch tensors: new ones in the main process (pinned when asked and CUDA is
  there), a preallocated shared-memory slot of a `BatchRing` in a DataLoader worker of a
  `StreamLoader` (the main process copies the slot out), else new shared-memory ones. Use it
  with `DataLoader(batch_size=None)`. No per-sample float tensor is built, nothing is stacked.
* `batched=False` (default): every item is one sample, for `DataLoader(batch_size=N)` with
  the default collate (evaluate, predict, tests). The batches equal the batched ones.

`make_dataloader(cfg, split, rank, world_size)` wraps a batched stream in a `StreamLoader`: a
DataLoader that counts consumed batches and has `state_dict()`, `load_state_dict()`,
`set_epoch()`.

Each sample is the SPEC 1 dict (a batch: the same with a leading batch dimension): eo (1,H,W)
f32, x (50,H,W) f32, y (50,H,W) f32, x_valid_mask (50,H,W) bool, y_valid_mask (50,H,W) bool,
x_valid_mask_1d (1,H,W) bool, land_mask (1,H,W) f32 (1 = ocean), date int64 YYYYMMDD, coords
f32 [lat, lon] (when return_coords), sample_id int64 (unique across splits: train 0..N-1, then
val).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .store import (
    META,
    N_LEVELS,
    CorruptSampleError,
    ShardReader,
    StoreError,
    meta_coords,
    quantizer_from,
    read_manifest,
    shard_file,
)

log = logging.getLogger(__name__)


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


def _new_tensor(shape: tuple, dtype: torch.dtype, where: str = "plain") -> torch.Tensor:
    """An uninitialised tensor: "plain", "shared" (shared memory, as torch's default collate
    makes in a worker, so sending it to another process copies nothing) or "pinned"."""
    if where == "shared":
        elem = torch.empty(0, dtype=dtype)
        storage = elem._typed_storage()._new_shared(math.prod(shape), device=elem.device)
        return elem.new(storage).view(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=where == "pinned")


class BatchRing:
    """Batch slots in shared memory through which DataLoader workers hand batches over.

    Handing a fresh tensor from a worker to the main process costs far more than decoding it:
    the worker creates a shared-memory segment per tensor and faults in every page of it, and
    the main process maps and unmaps it (kernel time about 4x the decode on a 2-core VM). Here
    every worker owns `slots` batch-sized slots, allocated once: it decodes a batch into a
    free slot and sends only a `RingTicket` (worker, slot, size); the main process copies the
    slot into the batch it hands out and frees the slot. With pin_memory the DataLoader's pin
    thread does that copy (`RingTicket.pin_memory`), straight into pinned memory, off the
    training loop and instead of the usual pin copy. No batch handed out aliases a slot. Slot flags are guarded by one lock (a
    memory barrier between the processes). A worker frees all its slots when it starts an
    iteration: by then the DataLoader has drained whatever the previous iteration left behind.

    With prefetch_factor + 1 slots a worker finds a free one in steady state (at most
    prefetch_factor batches outstanding, plus the one being copied). When it does not (one
    worker serving the others' share at an epoch's end, or results the DataLoader discards
    after an early stop) it waits up to `wait_s`, then sends a fresh shared-memory batch as
    torch does, so nothing can deadlock.
    """

    def __init__(self, workers: int, slots: int, batch_size: int,
                 specs: dict[str, tuple[tuple[int, ...], torch.dtype]], lock: Any):
        self.workers, self.slots, self.batch_size = workers, slots, batch_size
        self.token = int.from_bytes(os.urandom(6), "little")
        self.buf = {k: _new_tensor((workers, slots, batch_size, *shape), dt, "shared")
                    for k, (shape, dt) in specs.items()}
        self.busy = _new_tensor((workers, slots), torch.uint8, "shared").zero_()
        self.lock = lock
        self.wait_s = 1.0
        _RINGS[self.token] = self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buf.values())

    def reset(self, worker: int) -> None:
        with self.lock:
            self.busy[worker].zero_()

    def acquire(self, worker: int) -> int | None:
        """A free slot of `worker`, or None if none came free within `wait_s`."""
        deadline, delay = time.monotonic() + self.wait_s, 1e-4
        while True:
            with self.lock:
                for s in range(self.slots):
                    if not self.busy[worker, s]:
                        self.busy[worker, s] = 1
                        return s
            if time.monotonic() > deadline:
                return None
            time.sleep(delay)
            delay = min(2 * delay, 0.01)

    def release(self, worker: int, slot: int) -> None:
        with self.lock:
            self.busy[worker, slot] = 0

    def slot(self, worker: int, slot: int, n: int) -> dict[str, torch.Tensor]:
        return {k: t[worker, slot, :n] for k, t in self.buf.items()}

    def take(self, ticket: RingTicket, pin: bool = False) -> dict[str, torch.Tensor]:
        """Main process: the batch a worker announced, copied out of its slot; frees the slot."""
        if ticket.token != self.token:
            raise RuntimeError("BatchRing: a batch from another loader's workers")
        w, s, n = ticket.worker, ticket.slot, ticket.n
        try:
            out = {}
            for k, src in self.slot(w, s, n).items():
                out[k] = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
                out[k].copy_(src)
            return out
        finally:
            self.release(w, s)


_RINGS: weakref.WeakValueDictionary[int, BatchRing] = weakref.WeakValueDictionary()


class RingTicket:
    """What a worker sends for a batch it left in its BatchRing slot."""

    __slots__ = ("token", "worker", "slot", "n")

    def __init__(self, token: int, worker: int, slot: int, n: int):
        self.token, self.worker, self.slot, self.n = token, worker, slot, n

    def __getstate__(self) -> tuple:
        return self.token, self.worker, self.slot, self.n

    def __setstate__(self, state: tuple) -> None:
        self.token, self.worker, self.slot, self.n = state

    def redeem(self, pin: bool = False) -> dict[str, torch.Tensor]:
        ring = _RINGS.get(self.token)
        if ring is None:
            raise RuntimeError("RingTicket: its BatchRing is gone (a batch from a finished loader)")
        return ring.take(self, pin)

    def pin_memory(self) -> dict[str, torch.Tensor]:
        """Called by the DataLoader's pin thread: copy out straight into pinned memory."""
        return self.redeem(pin=True)


class ShardStream(IterableDataset):
    """One split of a store as a resumable, rank/worker-sharded, shuffled sample stream.

    `batched=True` yields whole batches of `batch_size` (see the module docstring; use
    `DataLoader(batch_size=None)`), otherwise single samples. `pin_memory` (batched only)
    allocates the batches in pinned memory when iterated in the main process with CUDA.
    """

    def __init__(self, store: str | Path, split: str = "train", *, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, seed: int = 7,
                 shuffle_buffer: int = 64, batch_size: int = 1, even_ranks: bool = True,
                 skip_corrupt: bool = False, return_coords: bool = True, batched: bool = False,
                 pin_memory: bool = False):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.store = Path(store)
        man = read_manifest(self.store)
        if split not in man["splits"]:
            raise StoreError(f"store {self.store} has no split {split!r} ({list(man['splits'])})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.split = split
        self.n = int(man["splits"][split]["n_samples"])
        self.shard = int(man["shard_samples"])
        self.n_shards = math.ceil(self.n / self.shard) if self.n else 0
        self.id_offset = int(man["sample_id_offset"][split])
        self.tile = int(man["tile_size"])
        self.quant = quantizer_from(man)
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.buffer = shuffle, seed, shuffle_buffer
        self.batch_size, self.even_ranks = batch_size, even_ranks
        self.skip_corrupt, self.return_coords = skip_corrupt, return_coords
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

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self._pos[0]), "consumed_batches": int(self._pos[1]),
                "batch_size": self.batch_size, "seed": self.seed, "world_size": self.world_size,
                "n_samples": self.n}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("batch_size", "seed", "world_size", "n_samples"):
            if key in state and state[key] != getattr(self, "n" if key == "n_samples" else key):
                raise StoreError(f"cannot resume {self.store}:{self.split}: saved {key}={state[key]}, "
                                 f"now {getattr(self, 'n' if key == 'n_samples' else key)}")
        self._pos[0], self._pos[1] = int(state["epoch"]), int(state["consumed_batches"])

    # ---- schedule ---------------------------------------------------------------------------
    def _rank_range(self, epoch: int) -> np.ndarray:
        order = np.arange(self.n_shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_shards)
        seq = np.concatenate([np.arange(s * self.shard, min((s + 1) * self.shard, self.n))
                              for s in order]) if self.n else np.zeros(0, np.int64)
        if self.even_ranks:
            per = self.n // self.world_size
            return seq[self.rank * per:(self.rank + 1) * per]
        return np.array_split(seq, self.world_size)[self.rank]

    def __len__(self) -> int:
        """Samples this rank yields per epoch."""
        return len(self._rank_range(0))

    def _worker_ranges(self, rank_seq: np.ndarray, workers: int) -> list[np.ndarray]:
        """Contiguous pieces of whole batches (the last piece may end in a partial batch)."""
        nb = math.ceil(rank_seq.size / self.batch_size)
        out, start = [], 0
        for w in range(workers):
            b = nb // workers + (w < nb % workers)
            out.append(rank_seq[start:start + b * self.batch_size])
            start += b * self.batch_size
        return out

    def schedule(self, epoch: int, worker: int, workers: int, consumed_batches: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(read sequence, remaining emit sequence) of sample indices for DataLoader worker `worker`."""
        pieces = self._worker_ranges(self._rank_range(epoch), workers)
        nb = [math.ceil(p.size / self.batch_size) for p in pieces]
        got, first = consumed_per_worker(consumed_batches, nb)
        worker = (worker + first) % workers  # DataLoader worker id -> schedule slot
        skip = got[worker] * self.batch_size
        piece = pieces[worker]
        rng = (np.random.default_rng([self.seed, epoch, self.rank, worker, workers])
               if self.shuffle else None)
        order = buffered_order(piece.size, self.buffer, rng)
        return piece, piece[order[skip:]]

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

    def _read_block(self, a: int, b: int) -> dict[int, tuple]:
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

    def batch_specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-sample shape and dtype of every key of a batch."""
        h = w = self.tile
        f32, bl = torch.float32, torch.bool
        specs = {"eo": ((1, h, w), f32), "x": ((N_LEVELS, h, w), f32), "y": ((N_LEVELS, h, w), f32),
                 "x_valid_mask": ((N_LEVELS, h, w), bl), "y_valid_mask": ((N_LEVELS, h, w), bl),
                 "x_valid_mask_1d": ((1, h, w), bl), "land_mask": ((1, h, w), f32),
                 "date": ((), torch.int64), "sample_id": ((), torch.int64)}
        if self.return_coords:
            specs["coords"] = ((2,), f32)
        return specs

    def decode_batch(self, ids: list[int], raws: list[tuple], where: str = "plain",
                     out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Raw stored samples -> one SPEC 1 batch (normalised, zero where invalid).

        Decodes the uint16 codes of each sample straight into its row of the batch tensors
        (new ones allocated `where`, or the first len(ids) rows of `out`): one ufunc pass
        each for code -> float32 (a * code), + b, * valid and for the mask; land_mask comes
        from the mask already written, x and its masks from the observed pixels only. Nothing
        per sample is allocated at full size and nothing is stacked.
        """
        bsz = len(raws)
        a, b = self.quant.norm_affine()
        if out is None:
            out = {k: _new_tensor((bsz, *shape), dt, where)
                   for k, (shape, dt) in self.batch_specs().items()}
        else:
            out = {k: v[:bsz] for k, v in out.items()}
        for k in ("x", "x_valid_mask", "x_valid_mask_1d"):  # sparse: zero, then scatter
            out[k].zero_()
        h, w = out["eo"].shape[-2:]
        eo, x, y = out["eo"].numpy(), out["x"].numpy(), out["y"].numpy()
        xv, yv, xv1 = out["x_valid_mask"].numpy(), out["y_valid_mask"].numpy(), out["x_valid_mask_1d"].numpy()
        land = out["land_mask"].numpy()
        eo_valid = np.empty((1, h, w), bool)  # (eo has no mask of its own in the batch)
        for j, (fields, obs, meta) in enumerate(raws):
            # eo and y: a * code + b where code != 0, else 0 (float32 throughout).
            np.not_equal(fields[0:1], 0, out=eo_valid)
            np.multiply(fields[0:1], a, out=eo[j])
            np.add(eo[j], b, out=eo[j])
            np.multiply(eo[j], eo_valid, out=eo[j])
            yj, yvj = y[j], yv[j]
            np.not_equal(fields[1:], 0, out=yvj)
            np.multiply(fields[1:], a, out=yj)
            np.add(yj, b, out=yj)
            np.multiply(yj, yvj, out=yj)
            np.copyto(land[j], yvj[0:1])
            k = int(meta[META["n_obs_pixels"]])
            if k:  # x: scatter the few observed pixels into the zeroed slot
                o = obs[:k]
                r, c, codes = o[:, 0].astype(np.intp), o[:, 1].astype(np.intp), o[:, 2:]
                ok = codes != 0
                xv[j][:, r, c] = ok.T
                xv1[j, 0, r, c] = ok.any(axis=1)  # from the few observed pixels, not a full pass
                x[j][:, r, c] = ((codes * a + b) * ok).T
        meta = np.stack([raw[2] for raw in raws])
        out["date"].numpy()[:] = meta[:, META["date"]]
        out["sample_id"].numpy()[:] = np.asarray(ids, np.int64) + self.id_offset
        if self.return_coords:
            out["coords"].numpy()[:] = meta_coords(meta)
        return out

    def decode(self, i: int, fields: np.ndarray, obs: np.ndarray, meta: np.ndarray) -> dict:
        """Raw stored sample -> the SPEC 1 tensors of one sample (the per-sample stream).

        Same values as decode_batch (tests check it bit for bit); kept separate because a batch
        of one built by decode_batch is slower for this path (torch allocation per key, x
        zeroed by a write instead of calloc's zero pages).
        """
        a, b = self.quant.norm_affine()
        valid = fields != 0
        vals = np.multiply(fields, a, dtype=np.float32)
        vals += b
        vals *= valid
        nd, h, w = fields.shape[0] - 1, fields.shape[1], fields.shape[2]
        x = np.zeros((nd, h, w), np.float32)
        xv = np.zeros((nd, h, w), bool)
        xv1 = np.zeros((1, h, w), bool)
        k = int(meta[META["n_obs_pixels"]])
        if k:
            o = obs[:k]
            r, c, codes = o[:, 0].astype(np.intp), o[:, 1].astype(np.intp), o[:, 2:]
            ok = codes != 0
            xv[:, r, c] = ok.T
            xv1[0, r, c] = ok.any(axis=1)  # from the few observed pixels, not a full pass
            x[:, r, c] = ((codes * a + b) * ok).T
        item = {
            "eo": torch.from_numpy(vals[0:1]),
            "x": torch.from_numpy(x),
            "y": torch.from_numpy(vals[1:]),
            "x_valid_mask": torch.from_numpy(xv),
            "y_valid_mask": torch.from_numpy(valid[1:]),
            "x_valid_mask_1d": torch.from_numpy(xv1),
            "land_mask": torch.from_numpy(valid[1:2].astype(np.float32)),
            "date": torch.tensor(int(meta[META["date"]]), dtype=torch.int64),
            "sample_id": torch.tensor(i + self.id_offset, dtype=torch.int64),
        }
        if self.return_coords:
            item["coords"] = torch.from_numpy(meta_coords(meta[None])[0].copy())
        return item

    def _raw_items(self, read_seq: np.ndarray, emit: np.ndarray) -> Iterator[tuple[int, tuple | None]]:
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
        cache: dict[int, tuple] = {}
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

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, consumed = int(self._pos[0]), int(self._pos[1])
        read_seq, emit = self.schedule(epoch, worker, workers, consumed)
        in_process = info is None
        items = self._raw_items(read_seq, emit) if emit.size else iter(())
        if self.batched:
            # Batch k of this worker = emit[k * bs:(k + 1) * bs] (the schedule's own cut), so a
            # resumed worker, whose emit sequence starts at a batch boundary, cuts the same.
            where = ("shared" if not in_process else
                     "pinned" if self.pin_memory and torch.cuda.is_available() else "plain")
            ring = self.ring if not in_process and self.ring is not None else None
            if ring is not None:
                if ring.workers != workers or ring.batch_size < self.batch_size:
                    raise RuntimeError(f"BatchRing for {ring.workers} workers x {ring.batch_size}"
                                       f" samples, loader has {workers} x {self.batch_size}")
                ring.reset(worker)
            for _ in range(math.ceil(emit.size / self.batch_size)):
                chunk = [(i, raw) for i, raw in itertools.islice(items, self.batch_size)
                         if raw is not None]
                if in_process:
                    self._pos[1] += 1
                if not chunk:  # only when every sample of the batch was skipped as corrupt
                    continue
                ids, raws = [i for i, _ in chunk], [raw for _, raw in chunk]
                if ring is None:
                    yield self.decode_batch(ids, raws, where)
                    continue
                slot = ring.acquire(worker)
                if slot is None:
                    log.debug("worker %d: no free ring slot, sending the batch itself", worker)
                    yield self.decode_batch(ids, raws, "shared")
                    continue
                try:
                    self.decode_batch(ids, raws, out=ring.slot(worker, slot, len(chunk)))
                except BaseException:
                    ring.release(worker, slot)
                    raise
                yield RingTicket(ring.token, worker, slot, len(chunk))
        else:
            for i, raw in items:
                if raw is None:  # skipped as corrupt
                    continue
                item = self.decode(i, *raw)
                if in_process:  # in-process iteration tracks its own position (batch_size 1)
                    self._pos[1] += 1 if self.batch_size == 1 else 0
                yield item
        if in_process:
            self._pos[0], self._pos[1] = epoch + 1, 0


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
        kw: dict[str, Any] = {}
        if num_workers > 0:
            kw = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor,
                  "multiprocessing_context": multiprocessing_context}
        self.use_ring = dataset.batched and num_workers > 0 and ring
        self.pin_memory = pin_memory
        if dataset.batched:
            dataset.pin_memory = pin_memory and num_workers == 0
            self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                     pin_memory=pin_memory and num_workers > 0, **kw)
        else:
            self.loader = DataLoader(dataset, batch_size=dataset.batch_size,
                                     num_workers=num_workers, pin_memory=pin_memory, **kw)
        self._ring_slots = (prefetch_factor or 2) + 1
        self._ring_busy = False  # an iteration (and its workers) may still use dataset.ring
        self._consumed = int(dataset._pos[1])

    def _ring(self) -> BatchRing:
        """The ring of the workers this iteration runs on (created before they start)."""
        ds = self.dataset
        if ds.ring is None or (self._ring_busy and not self.loader.persistent_workers):
            # Persistent workers keep the ring they started with; fresh workers reuse the last
            # one unless an unfinished iteration's workers may still write into it.
            ctx = self.loader.multiprocessing_context or torch.multiprocessing
            ds.ring = BatchRing(self.num_workers, self._ring_slots, ds.batch_size, ds.batch_specs(),
                                ctx.Lock())
        return ds.ring

    def __len__(self) -> int:
        return math.ceil(len(self.dataset) / self.dataset.batch_size)

    @property
    def epoch(self) -> int:
        return self.dataset.epoch

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self._consumed = 0

    def state_dict(self) -> dict[str, int]:
        sd = self.dataset.state_dict()
        sd["consumed_batches"] = self._consumed
        sd["num_workers"] = self.num_workers
        return sd

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "num_workers" in state and state["num_workers"] != self.num_workers:
            raise StoreError(f"cannot resume: saved with num_workers={state['num_workers']}, "
                             f"now {self.num_workers} (the per-worker schedules differ)")
        self.dataset.load_state_dict(state)
        self._consumed = int(state["consumed_batches"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        ds = self.dataset
        ds._pos[1] = self._consumed  # workers read this when they (re)start their iterator
        epoch = ds.epoch
        ring = self._ring() if self.use_ring else None
        self._ring_busy = ring is not None
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
                     return_coords=cfg.dataset.return_coords, batched=True)
    ds.set_epoch(epoch)
    return StreamLoader(ds, num_workers=nw, pin_memory=d.pin_memory and torch.cuda.is_available(),
                        persistent_workers=d.persistent_workers if train else False,
                        prefetch_factor=d.prefetch_factor)
