"""Shared fixtures: one small synthetic ocean and one store built from it (tile 32, 5 days)."""

from __future__ import annotations

from pathlib import Path

import pytest

from depthdif_hpc.config import load_config
from depthdif_hpc.data.synthetic import build_tiny_store

TILE = 32


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """out_dir of build_tiny_store: sources/ and store.zarr (2 x 2 tiles, 2017-12-30..2018-01-03)."""
    out = tmp_path_factory.mktemp("tiny")
    build_tiny_store(out, tile_size=TILE, shard_samples=3)
    return out


@pytest.fixture(scope="session")
def tiny_store(tiny) -> Path:
    return tiny / "store.zarr"


@pytest.fixture(scope="session")
def tiny_sources(tiny) -> dict[str, str]:
    s = tiny / "sources"
    return {k: str(s / k / "*.nc") for k in ("glorys", "ostia", "en4")}


def tiny_config(*extra: str):
    return load_config(overrides=[f"dataset.grid.tile_size={TILE}",
                                  f"dataset.grid.patch_stride={TILE // 2}",
                                  "split.val_year=2018", "dataset.layout.shard_samples=3", *extra])


def per_sample_batches(store: Path, split: str, bs: int, workers: int, epoch: int,
                       **kw) -> list[dict]:
    """The reference for the batched path: per-sample items through a DataLoader with the
    default collate."""
    from torch.utils.data import DataLoader

    from depthdif_hpc.data.stream import ShardStream

    ds = ShardStream(store, split, shuffle=True, seed=7, shuffle_buffer=64, batch_size=bs, **kw)
    ds.set_epoch(epoch)
    return list(DataLoader(ds, batch_size=bs, num_workers=workers))
