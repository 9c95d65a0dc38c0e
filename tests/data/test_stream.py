"""Streaming: rank/worker sharding, epochs, exact resume, corrupt shards, the batched path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from depthdif_hpc.data.batch import check_batch
from depthdif_hpc.data.grid import Tile
from depthdif_hpc.data.store import CorruptSampleError, StoreError, read_manifest
from depthdif_hpc.data.stream import ShardStream, make_dataloader

from .conftest import TILE, tiny_config


def _ids(loader) -> list[list[int]]:
    return [b["sample_id"].tolist() for b in loader]


def test_items_follow_the_batch_contract(tiny_store):
    ds = ShardStream(tiny_store, "val", shuffle=False)
    items = list(ds)
    assert len(items) == read_manifest(tiny_store)["splits"]["val"]["n_samples"] == len(ds)
    b = default_collate(items[:3])
    check_batch(b, "collated items", sizes={"B": 3, "D": 50, "H": TILE, "W": TILE})
    assert "coords" in b
    assert torch.equal(b["land_mask"], b["y_valid_mask"][:, :1].float())
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
            batches = _ids(ld)
            assert len(batches) == len(ld)
            seen.append([i for b in batches for i in b])
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
@pytest.mark.gpu
@pytest.mark.parametrize("workers", [0, 2])
def test_pinned_batches(tiny_store, workers):
    """Pinning changes where a batch lives, nothing else: the same loader unpinned is the
    reference (val's order is not per_sample_batches' shuffled one, as an H100 run found)."""
    def loader(pin: bool):
        cfg = tiny_config(f"dataloader.pin_memory={str(pin).lower()}")
        return make_dataloader(cfg, "val", store=tiny_store, batch_size=4, num_workers=workers)

    ref = list(loader(False))
    assert ref
    for a, b in zip(ref, loader(True), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k].is_pinned() and not a[k].is_pinned() and torch.equal(a[k], b[k]), k


def test_forkserver_workers_survive_the_stop_signals(tiny_store):
    """SLURM signals every process of the step: spawn/forkserver workers do not inherit the
    trainer's handlers, and must not die of SIGTERM while the trainer checkpoints."""
    import os
    import signal

    import psutil

    from depthdif_hpc.data.stream import StreamLoader

    ds = ShardStream(tiny_store, "train", shuffle=False, batch_size=2, batched=True)
    loader = StreamLoader(ds, num_workers=1, multiprocessing_context="forkserver",
                          persistent_workers=True)
    it = iter(loader)
    first = next(it)
    # forkserver workers are children of the fork server, itself a child of this process
    workers = [p for p in psutil.Process().children(recursive=True) if p.ppid() != os.getpid()]
    assert workers, "no forkserver worker found"
    for p in workers:
        os.kill(p.pid, signal.SIGUSR1)
        os.kill(p.pid, signal.SIGTERM)
    rest = list(it)  # a killed worker: "DataLoader worker (pid ...) exited unexpectedly"
    assert 1 + len(rest) == len(loader) and first["x"].shape[0] == 2
    assert all(p.is_running() for p in workers)
