"""Handing batches over from DataLoader workers through the shared-memory BatchRing."""

from __future__ import annotations

import torch

from depthdif_hpc.data.ring import BatchRing, RingTicket
from depthdif_hpc.data.stream import ShardStream, StreamLoader, make_dataloader

from .conftest import per_sample_batches, tiny_config


def test_ring_handoff_batches_do_not_alias_and_survive_early_stops(tiny_store):
    cfg = tiny_config("dataloader.persistent_workers=true")
    ref = per_sample_batches(tiny_store, "train", 2, 2, 0)
    for persistent in (True, False):
        ld = make_dataloader(cfg, "train", store=tiny_store, batch_size=2, num_workers=2,
                             shuffle=True)
        ld = StreamLoader(ld.dataset, num_workers=2, persistent_workers=persistent)
        assert ld.use_ring
        it = iter(ld)
        next(it)
        it.close()  # stop early: the ring slots still held by the workers must come back
        ld.set_epoch(0)
        held = list(ld)  # every batch kept alive while later ones are decoded
        ring = ld.dataset.ring
        assert ring is not None and ring.slots == 3  # prefetch_factor 2, + 1
        assert all(b["y"].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
                   for b in held for t in ring.buf.values())
        for a, b in zip(ref, held, strict=True):
            for k in a:
                assert torch.equal(a[k], b[k]), (persistent, k)
        again = list(ld)  # next epoch, same ring
        assert ld.dataset.ring is ring and len(again) == len(held)
    # No free slot (e.g. one worker serving the others' share): the batch itself is sent.
    ld = StreamLoader(ShardStream(tiny_store, "train", shuffle=True, batch_size=2, batched=True),
                      num_workers=2, prefetch_factor=1)
    ring = ld._ring()
    ring.slots, ring.wait_s = 0, 0.0  # (before the workers start: they get this ring)
    for a, b in zip(ref, list(ld), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k
    # Without the ring the workers send their own shared-memory tensors: same batches.
    ld = StreamLoader(ShardStream(tiny_store, "train", shuffle=True, batch_size=2, batched=True),
                      num_workers=2, ring=False)
    assert not ld.use_ring
    for a, b in zip(ref, list(ld), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_pin_thread_redeems_ring_tickets(tiny_store, monkeypatch):
    """torch's pin thread calls `pin_memory()` on what a worker sent: a RingTicket copies its
    slot out right there (into pinned memory), so the training loop never does the copy."""
    from torch.utils.data._utils.pin_memory import pin_memory

    ld = StreamLoader(ShardStream(tiny_store, "val", batch_size=2, batched=True), num_workers=2)
    ring = ld._ring()
    calls = []
    monkeypatch.setattr(BatchRing, "take", lambda self, t, pin=False: calls.append((self, t, pin)))
    ticket = RingTicket(ring.token, 1, 0, 2)
    pin_memory(ticket)
    assert calls == [(ring, ticket, True)]
