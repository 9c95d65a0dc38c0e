"""Shared-memory batch slots through which DataLoader workers hand whole batches over."""

from __future__ import annotations

import os
import time
import weakref
from typing import Any, cast

import torch

from .batch import Batch
from .decode import Specs, new_tensor


class BatchRing:
    """Batch slots in shared memory through which DataLoader workers hand batches over.

    Handing a fresh tensor from a worker to the main process costs far more than decoding it:
    the worker creates a shared-memory segment per tensor and faults in every page of it, and
    the main process maps and unmaps it (kernel time about 4x the decode on a 2-core VM). Here
    every worker owns `slots` batch-sized slots, allocated once: it decodes a batch into a
    free slot and sends only a `RingTicket` (worker, slot, size); the main process copies the
    slot into the batch it hands out and frees the slot. With pin_memory the DataLoader's pin
    thread does that copy (`RingTicket.pin_memory`), straight into pinned memory, off the
    training loop and instead of the usual pin copy. No batch handed out aliases a slot. Slot
    flags are guarded by one lock (a memory barrier between the processes). A worker frees all
    its slots when it starts an iteration: by then the DataLoader has drained whatever the
    previous iteration left behind.

    With prefetch_factor + 1 slots a worker finds a free one in steady state (at most
    prefetch_factor batches outstanding, plus the one being copied). When it does not (one
    worker serving the others' share at an epoch's end, or results the DataLoader discards
    after an early stop) it waits up to `wait_s`, then sends a fresh shared-memory batch as
    torch does, so nothing can deadlock.
    """

    def __init__(self, workers: int, slots: int, batch_size: int, specs: Specs, lock: Any):
        self.workers, self.slots, self.batch_size = workers, slots, batch_size
        self.token = int.from_bytes(os.urandom(6), "little")
        self.buf = {k: new_tensor((workers, slots, batch_size, *shape), dt, "shared")
                    for k, (shape, dt) in specs.items()}
        self.busy = new_tensor((workers, slots), torch.uint8, "shared").zero_()
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

    def take(self, ticket: RingTicket, pin: bool = False) -> Batch:
        """Main process: the batch a worker announced, copied out of its slot; frees the slot."""
        if ticket.token != self.token:
            raise RuntimeError("BatchRing: a batch from another loader's workers")
        w, s, n = ticket.worker, ticket.slot, ticket.n
        try:
            out = {}
            for k, src in self.slot(w, s, n).items():
                out[k] = torch.empty(src.shape, dtype=src.dtype, pin_memory=pin)
                out[k].copy_(src)
            return cast(Batch, out)
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

    def redeem(self, pin: bool = False) -> Batch:
        ring = _RINGS.get(self.token)
        if ring is None:
            raise RuntimeError("RingTicket: its BatchRing is gone (a batch from a finished loader)")
        return ring.take(self, pin)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin thread: copy out straight into pinned memory."""
        return self.redeem(pin=True)
