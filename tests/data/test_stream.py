"""Streaming: batch contract, rank/worker sharding, epochs, exact resume, corrupt shards."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from depthdif_hpc.data.grid import Tile
from depthdif_hpc.data.store import CorruptSampleError, StoreError, read_manifest
from depthdif_hpc.data.stream import (
    ShardStream,
    buffered_order,
    consumed_per_worker,
    make_dataloader,
)

from .conftest import TILE, tiny_config


def _ids(loader) -> list[list[int]]:
    return [b["sample_id"].tolist() for b in loader]


def test_items_follow_the_batch_contract(tiny_store):
    ds = ShardStream(tiny_store, "val", shuffle=False)
    items = list(ds)
    assert len(items) == read_manifest(tiny_store)["splits"]["val"]["n_samples"] == len(ds)
    b = default_collate(items[:3])
    shapes = {"eo": (1, TILE, TILE), "x": (50, TILE, TILE), "y": (50, TILE, TILE),
              "x_valid_mask": (50, TILE, TILE), "y_valid_mask": (50, TILE, TILE),
              "x_valid_mask_1d": (1, TILE, TILE), "land_mask": (1, TILE, TILE), "date": (),
              "coords": (2,), "sample_id": ()}
    dtypes = {"eo": torch.float32, "x": torch.float32, "y": torch.float32, "land_mask": torch.float32,
              "x_valid_mask": torch.bool, "y_valid_mask": torch.bool, "x_valid_mask_1d": torch.bool,
              "date": torch.int64, "coords": torch.float32, "sample_id": torch.int64}
    assert set(b) == set(shapes)
    for k, s in shapes.items():
        assert tuple(b[k].shape) == (3, *s), k
        assert b[k].dtype == dtypes[k], k
    assert torch.equal(b["land_mask"], b["y_valid_mask"][:, :1].float())
    assert torch.equal(b["x_valid_mask_1d"], b["x_valid_mask"].any(1, keepdim=True))
    assert (b["y"][~b["y_valid_mask"]] == 0).all() and (b["x"][~b["x_valid_mask"]] == 0).all()
    assert b["x_valid_mask"].sum() > 0 and (~b["y_valid_mask"]).sum() > 0  # sparse x, sea floor
    assert all(20180101 <= d <= 20180131 for d in b["date"].tolist())  # val year 2018
    man = read_manifest(tiny_store)
    ids = sorted(i["sample_id"].item() for i in items)
    off = man["sample_id_offset"]["val"]
    assert ids == list(range(off, off + len(items)))
    # coords: the tile centre of the stored tile
    lat, lon = b["coords"][0].tolist()
    tiles = [Tile(int(k), r, c, TILE, 0.1) for k, (r, c) in man["tiles"].items()]
    assert any(abs(t.centre()[0] - lat) < 1e-4 and abs(t.centre()[1] - lon) < 1e-4 for t in tiles)


def test_two_ranks_two_workers_cover_every_sample_once_per_epoch(tiny_store):
    cfg = tiny_config("dataloader.even_ranks=false")
    n = read_manifest(tiny_store)["splits"]["val"]["n_samples"]
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            ld = make_dataloader(cfg, "val", rank, 2, store=tiny_store, batch_size=2,
                                 num_workers=2, shuffle=True, epoch=epoch)
            seen.append([i for b in _ids(ld) for i in b])
        flat = seen[0] + seen[1]
        assert sorted(flat) == sorted(set(flat)) and len(flat) == n  # exactly once
        assert not set(seen[0]) & set(seen[1])
        orders.append(flat)
    assert orders[0] != orders[1]  # reshuffled per epoch
    # even_ranks: equal counts on both ranks, still no sample twice.
    cfg = tiny_config()
    per = [[i for b in _ids(make_dataloader(cfg, "val", r, 2, store=tiny_store, batch_size=2,
                                            num_workers=2, shuffle=True)) for i in b] for r in (0, 1)]
    assert len(per[0]) == len(per[1]) == n // 2 and not set(per[0]) & set(per[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_reproduces_the_rest(tiny_store, workers):
    cfg = tiny_config()
    ref = make_dataloader(cfg, "val", store=tiny_store, batch_size=2, num_workers=workers,
                          shuffle=True, epoch=3)
    full = _ids(ref)
    assert len(full) >= 5 and ref.epoch == 4
    part = make_dataloader(cfg, "val", store=tiny_store, batch_size=2, num_workers=workers,
                           shuffle=True, epoch=3)
    it, got = iter(part), []
    for _ in range(3):
        got.append(next(it)["sample_id"].tolist())
    state = part.state_dict()
    del it
    assert state["epoch"] == 3 and state["consumed_batches"] == 3
    fresh = make_dataloader(cfg, "val", store=tiny_store, batch_size=2, num_workers=workers,
                            shuffle=True)
    fresh.load_state_dict(state)
    rest = _ids(fresh)
    assert got + rest == full
    assert fresh.epoch == 4 and _ids(fresh) != full  # then the next epoch, a new order


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


def _damaged_copy(tiny_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, store)
    return store


def test_truncated_chunk_gives_a_named_error(tiny_store, tmp_path):
    store = _damaged_copy(tiny_store, tmp_path)
    shard = store / "val" / "fields" / "c" / "1" / "0" / "0" / "0"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    ds = ShardStream(store, "val", shuffle=False)
    with pytest.raises(CorruptSampleError, match=r"split val, shard 1, sample 3 \(sample_id \d+\)"):
        list(ds)
    # Skip mode: the three samples of that shard are skipped and counted, the rest stream.
    ds = ShardStream(store, "val", shuffle=False, skip_corrupt=True)
    got = [i["sample_id"].item() for i in ds]
    assert ds.skipped == 3 and len(got) == len(ds) - 3


def test_missing_shard_and_incomplete_store_are_named(tiny_store, tmp_path):
    store = _damaged_copy(tiny_store, tmp_path)
    shutil.rmtree(store / "val" / "obs" / "c" / "2")
    with pytest.raises(CorruptSampleError, match=r"shard 2: shard file .*obs.* is missing"):
        list(ShardStream(store, "val", shuffle=False))
    (store / "manifest.json").unlink()
    with pytest.raises(StoreError, match="build is incomplete"):
        make_dataloader(tiny_config(), "val", store=store)


def test_direct_shard_reader_equals_zarr(tiny_store):
    import zarr

    ds = ShardStream(tiny_store, "val", shuffle=False)
    ds._open()
    assert set(ds._fast) == {"fields", "obs", "meta"}  # the hot path is in use
    g = zarr.open_group(str(tiny_store), mode="r")["val"]
    n = ds.n
    for name, reader in ds._fast.items():
        for a in range(0, n, ds.shard):
            b = min(a + ds.shard, n)
            np.testing.assert_array_equal(reader.read(a, b), g[name][a:b], err_msg=name)
            np.testing.assert_array_equal(reader.read(b - 1, b), g[name][b - 1:b], err_msg=name)
    # Without it (any other layout) zarr's own reader gives the same items.
    fast = list(ds)
    ds._fast = {}
    slow = list(ds)
    for x, y in zip(fast, slow, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_checksummed_store_names_a_flipped_byte(tiny_sources, tmp_path):
    from depthdif_hpc.data.build import build_store

    cfg = tiny_config("dataset.layout.checksum=true", "dataset.selection.end_date=2017-12-31")
    store = build_store(cfg, tiny_sources["glorys"], tiny_sources["ostia"], tiny_sources["en4"],
                        tmp_path / "crc.zarr", workers=1, progress=False)
    shard = store / "train" / "fields" / "c" / "0" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF  # inside the first sample's chunk
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptSampleError, match=r"shard 0, sample 0 .*checksum mismatch"):
        list(ShardStream(store, "train", shuffle=False))


def test_persistent_workers_follow_epochs_and_resume_position(tiny_store):
    cfg = tiny_config("dataloader.persistent_workers=true")
    ld = make_dataloader(cfg, "train", store=tiny_store, batch_size=2, num_workers=2, shuffle=True)
    assert ld.loader.persistent_workers
    n = read_manifest(tiny_store)["splits"]["train"]["n_samples"]
    e0 = [i for b in _ids(ld) for i in b]
    e1 = [i for b in _ids(ld) for i in b]  # same worker processes, next epoch
    assert sorted(e0) == sorted(e1) == list(range(n)) and e0 != e1
    ref = make_dataloader(cfg, "train", store=tiny_store, batch_size=2, num_workers=2,
                          shuffle=True, epoch=1)
    assert [i for b in _ids(ref) for i in b] == e1


# ---- the batched path (what make_dataloader builds) ------------------------------------------

_KEYS = {"eo": torch.float32, "x": torch.float32, "y": torch.float32, "land_mask": torch.float32,
         "x_valid_mask": torch.bool, "y_valid_mask": torch.bool, "x_valid_mask_1d": torch.bool,
         "date": torch.int64, "coords": torch.float32, "sample_id": torch.int64}


def _per_sample_batches(store, split, bs, workers, epoch, **kw):
    """The reference: per-sample items through a DataLoader with the default collate."""
    from torch.utils.data import DataLoader

    ds = ShardStream(store, split, shuffle=True, seed=7, shuffle_buffer=64, batch_size=bs, **kw)
    ds.set_epoch(epoch)
    return list(DataLoader(ds, batch_size=bs, num_workers=workers))


def _reference_sample(store: Path, split: str, i: int) -> dict[str, np.ndarray]:
    """Sample i decoded independently of stream.py: zarr + Quantizer.decode_c + SPEC 1 z-score."""
    import zarr

    from depthdif_hpc.data.store import META, meta_coords, quantizer_from
    from depthdif_hpc.normalization import KELVIN_OFFSET, TEMP_MEAN_K, TEMP_STD_K

    man = read_manifest(store)
    g = zarr.open_group(str(store), mode="r")[split]
    fields, obs, meta = g["fields"][i], g["obs"][i], g["meta"][i]
    q = quantizer_from(man)
    norm = (q.decode_c(fields).astype(np.float64) + KELVIN_OFFSET - TEMP_MEAN_K) / TEMP_STD_K
    valid = fields != 0
    x = np.zeros(fields[1:].shape)
    for row in obs[: meta[META["n_obs_pixels"]]]:
        codes = row[2:]
        x[:, row[0], row[1]] = np.where(codes != 0, (q.decode_c(codes).astype(np.float64)
                                                      + KELVIN_OFFSET - TEMP_MEAN_K) / TEMP_STD_K, 0)
    xv = np.zeros(fields[1:].shape, bool)
    for row in obs[: meta[META["n_obs_pixels"]]]:
        xv[:, row[0], row[1]] = row[2:] != 0
    return {"eo": np.where(valid[:1], norm[:1], 0), "y": np.where(valid[1:], norm[1:], 0), "x": x,
            "y_valid_mask": valid[1:], "x_valid_mask": xv, "land_mask": valid[1:2].astype(np.float32),
            "x_valid_mask_1d": xv.any(0, keepdims=True), "date": meta[META["date"]],
            "coords": meta_coords(meta[None])[0],
            "sample_id": i + man["sample_id_offset"][split]}


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_loader_equals_per_sample_decode(tiny_store, workers):
    cfg = tiny_config()
    for epoch in (0, 1):
        ld = make_dataloader(cfg, "val", store=tiny_store, batch_size=4, num_workers=workers,
                             shuffle=True, epoch=epoch)
        assert ld.dataset.batched and ld.loader.batch_size is None
        got = list(ld)
        ref = _per_sample_batches(tiny_store, "val", 4, workers, epoch)
        assert [b["sample_id"].tolist() for b in got] == [b["sample_id"].tolist() for b in ref]
        for b, r in zip(got, ref, strict=True):
            assert set(b) == set(r) == set(_KEYS)
            for k, dt in _KEYS.items():
                assert b[k].dtype == dt and b[k].is_contiguous(), k
                assert torch.equal(b[k], r[k]), k  # bit for bit (-0.0 == 0.0)
    # And against a decode written from the format description, not from stream.py.
    off = read_manifest(tiny_store)["sample_id_offset"]["val"]
    for b in got[:2]:
        for j, sid in enumerate(b["sample_id"].tolist()):
            want = _reference_sample(tiny_store, "val", sid - off)
            for k, v in want.items():
                np.testing.assert_allclose(b[k][j].double().numpy(), np.asarray(v, np.float64),
                                           rtol=0, atol=2e-6, err_msg=k)


def test_batched_stream_without_coords_and_in_process_position(tiny_store):
    ds = ShardStream(tiny_store, "val", shuffle=True, batch_size=5, batched=True, return_coords=False)
    n = len(ds)
    it = iter(ds)
    first = next(it)
    assert "coords" not in first and first["y"].shape[0] == 5
    assert ds.state_dict()["consumed_batches"] == 1  # in-process iteration counts batches
    rest = list(it)
    assert [len(b["sample_id"]) for b in [first, *rest]] == [5, 5, n - 10]
    assert ds.epoch == 1 and ds.state_dict()["consumed_batches"] == 0
    # A stream built from a saved mid-epoch position yields exactly the remaining batches.
    ds.set_epoch(0)
    ds2 = ShardStream(tiny_store, "val", shuffle=True, batch_size=5, batched=True, return_coords=False)
    ds2.load_state_dict({"epoch": 0, "consumed_batches": 1, "batch_size": 5})
    for a, b in zip(rest, ds2, strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_resume_at_every_batch_is_exact(tiny_store, workers):
    """Batches of 2 over shards of 3 and a shuffle buffer: every resume point lies inside a shard
    block, some inside a partly emitted buffer; the rest of the epoch must be the same tensors."""
    cfg = tiny_config("dataloader.shuffle_buffer=4")
    mk = lambda **kw: make_dataloader(cfg, "val", store=tiny_store, batch_size=2,  # noqa: E731
                                      num_workers=workers, shuffle=True, **kw)
    full = list(mk(epoch=2))
    for k in range(len(full) + 1):
        part = mk(epoch=2)
        it = iter(part)
        for _ in range(k):
            next(it)
        state = part.state_dict()
        it.close()
        fresh = mk()
        fresh.load_state_dict(state)
        rest = list(fresh)
        assert len(rest) == len(full) - k
        for a, b in zip(full[k:], rest, strict=True):
            for key in a:
                assert torch.equal(a[key], b[key]), (k, key)
        assert fresh.epoch == 3


def test_ring_handoff_batches_do_not_alias_and_survive_early_stops(tiny_store):
    cfg = tiny_config("dataloader.persistent_workers=true")
    ref = _per_sample_batches(tiny_store, "train", 2, 2, 0)
    for persistent in (True, False):
        from depthdif_hpc.data.stream import StreamLoader

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


def test_batched_skip_mode_keeps_batch_boundaries(tiny_store, tmp_path):
    store = _damaged_copy(tiny_store, tmp_path)
    shard = store / "val" / "fields" / "c" / "1" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:100])
    cfg = tiny_config("dataset.skip_corrupt_samples=true")
    good = list(make_dataloader(cfg, "val", store=tiny_store, batch_size=2, shuffle=False))
    got = list(make_dataloader(cfg, "val", store=store, batch_size=2, shuffle=False))
    # Samples 3, 4, 5 (shard 1) are gone; every other batch keeps its place.
    off = read_manifest(tiny_store)["sample_id_offset"]["val"]
    want = [[i for i in b["sample_id"].tolist() if i - off not in (3, 4, 5)] for b in good]
    assert [b["sample_id"].tolist() for b in got] == [w for w in want if w]
    with pytest.raises(CorruptSampleError, match=r"shard 1, sample 3"):
        list(make_dataloader(tiny_config(), "val", store=store, batch_size=2, shuffle=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_batches(tiny_store, workers):
    cfg = tiny_config("dataloader.pin_memory=true")
    ld = make_dataloader(cfg, "val", store=tiny_store, batch_size=4, num_workers=workers)
    ref = _per_sample_batches(tiny_store, "val", 4, workers, 0)
    for a, b in zip(ref, ld, strict=True):
        for k in a:
            assert b[k].is_pinned() and torch.equal(a[k], b[k]), k


def test_pin_thread_redeems_ring_tickets(tiny_store, monkeypatch):
    """torch's pin thread calls `pin_memory()` on what a worker sent: a RingTicket copies its
    slot out right there (into pinned memory), so the training loop never does the copy."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from depthdif_hpc.data.stream import BatchRing, RingTicket, StreamLoader

    ld = StreamLoader(ShardStream(tiny_store, "val", batch_size=2, batched=True), num_workers=2)
    ring = ld._ring()
    calls = []
    monkeypatch.setattr(BatchRing, "take", lambda self, t, pin=False: calls.append((self, t, pin)))
    ticket = RingTicket(ring.token, 1, 0, 2)
    pin_memory(ticket)
    assert calls == [(ring, ticket, True)]
