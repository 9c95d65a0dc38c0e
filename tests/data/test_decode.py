"""Decoding stored samples into the batch contract, bit for bit on every path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from depthdif_hpc.data.batch import FIELDS, check_batch
from depthdif_hpc.data.decode import Decoder, scatter_obs
from depthdif_hpc.data.store import META, read_manifest
from depthdif_hpc.data.stream import make_dataloader

from .conftest import TILE, per_sample_batches, tiny_config

_KEYS = {f.name: f.dtype for f in FIELDS}


def _reference_sample(store: Path, split: str, i: int) -> dict[str, np.ndarray]:
    """Sample i decoded independently of decode.py: zarr + Quantizer.decode_c + the z-score of
    docs/model.md#normalization."""
    import zarr

    from depthdif_hpc.data.store import meta_coords, quantizer_from
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
            "date": meta[META["date"]], "coords": meta_coords(meta[None])[0],
            "sample_id": i + man["sample_id_offset"][split]}


@pytest.mark.parametrize("workers", [0, 2])
def test_batched_loader_equals_per_sample_decode(tiny_store, workers):
    cfg = tiny_config()
    for epoch in (0, 1):
        ld = make_dataloader(cfg, "val", store=tiny_store, batch_size=4, num_workers=workers,
                             shuffle=True, epoch=epoch)
        assert ld.dataset.batched and ld.loader.batch_size is None
        got = list(ld)
        ref = per_sample_batches(tiny_store, "val", 4, workers, epoch)
        assert [b["sample_id"].tolist() for b in got] == [b["sample_id"].tolist() for b in ref]
        for b, r in zip(got, ref, strict=True):
            assert set(b) == set(r) == set(_KEYS)
            for k, dt in _KEYS.items():
                assert b[k].dtype == dt and b[k].is_contiguous(), k
                assert torch.equal(b[k], r[k]), k  # bit for bit (-0.0 == 0.0)
    # And against a decode written from the format description, not from decode.py.
    off = read_manifest(tiny_store)["sample_id_offset"]["val"]
    for b in got[:2]:
        for j, sid in enumerate(b["sample_id"].tolist()):
            want = _reference_sample(tiny_store, "val", sid - off)
            for k, v in want.items():
                np.testing.assert_allclose(b[k][j].double().numpy(), np.asarray(v, np.float64),
                                           rtol=0, atol=2e-6, err_msg=k)


def test_scatter_obs_writes_only_the_observed_pixels():
    a, b = np.float32(0.5), np.float32(-1.0)
    obs = np.array([[0, 2, 3, 0, 1], [3, 1, 0, 5, 7], [1, 1, 9, 9, 9]], np.uint16)
    x, xv = np.zeros((3, 4, 4), np.float32), np.zeros((3, 4, 4), bool)
    scatter_obs(obs, 2, a, b, x, xv)  # the third row is past n_obs: padding
    want_v = np.zeros((3, 4, 4), bool)
    want_v[:, 0, 2] = [True, False, True]
    want_v[:, 3, 1] = [False, True, True]
    np.testing.assert_array_equal(xv, want_v)
    assert x[:, 0, 2].tolist() == [0.5, 0.0, -0.5] and x[:, 3, 1].tolist() == [0.0, 1.5, 2.5]
    assert (x[~want_v] == 0).all()
    scatter_obs(obs, 0, a, b, x, xv)  # no observations: nothing written
    np.testing.assert_array_equal(xv, want_v)


def _raws(store: Path, split: str, ids: list[int]) -> list[tuple]:
    import zarr

    g = zarr.open_group(str(store), mode="r")[split]
    return [(g["fields"][i], g["obs"][i], g["meta"][i]) for i in ids]


@pytest.mark.parametrize("return_coords", [True, False])
def test_batch_and_sample_decode_agree_and_follow_the_contract(tiny_store, return_coords):
    man = read_manifest(tiny_store)
    dec = Decoder.from_manifest(man, return_coords)
    ids = [0, 4, 2, 7]
    raws = _raws(tiny_store, "val", ids)
    assert any(r[2][META["n_obs_pixels"]] for r in raws)  # some observed pixels to scatter
    batch = dec.decode_batch([100 + i for i in ids], raws)
    check_batch(batch, "decode_batch", sizes={"B": 4, "D": 50, "H": TILE, "W": TILE})
    assert ("coords" in batch) == return_coords
    # Into a reused buffer holding an older batch (a ring slot): the same tensors.
    out = {k: torch.full((6, *shape), 7).to(dt) for k, (shape, dt) in dec.batch_specs().items()}
    again = dec.decode_batch([100 + i for i in ids], raws, out=out)
    for j, i in enumerate(ids):
        item = dec.decode(100 + i, *raws[j])
        assert set(item) == set(batch)
        for k in batch:
            assert torch.equal(batch[k][j], item[k]) and torch.equal(again[k][j], item[k]), k
    assert batch["sample_id"].tolist() == [100 + i for i in ids]


def test_per_level_decode_matches_the_stored_temperatures(tiny_store):
    import zarr

    from depthdif_hpc.data.store import level_stats, quantizer_from
    from depthdif_hpc.data.stream import ShardStream
    from depthdif_hpc.normalization import Normalizer

    man = read_manifest(tiny_store)
    mean, std = level_stats(man)
    count = np.asarray(man["stats"]["train_y_level_count"])
    # Levels without train pixels carry the deepest populated level's statistics; std >= 0.05.
    last = int(np.flatnonzero(count > 0)[-1])
    assert all(m == mean[last] for m in mean[last:]) and min(std) >= 0.05
    norm = Normalizer.per_level(mean, std)
    g = zarr.open_group(str(tiny_store), mode="r")["val"]
    q = quantizer_from(man)
    s = ShardStream(tiny_store, "val", shuffle=False, even_ranks=False, normalizer=norm)
    for item in list(s)[:3]:
        i = int(item["sample_id"]) - s.id_offset
        fields, obs, meta = g["fields"][i], g["obs"][i], g["meta"][i]
        want = q.decode_c(fields)
        vm = item["y_valid_mask"].numpy()
        y = norm.denormalize(item["y"][None].double())[0].numpy()
        assert np.abs(y[vm] - want[1:][vm]).max() < 1e-4 and (item["y"].numpy()[~vm] == 0).all()
        eo = norm.denormalize(item["eo"][None].double())[0, 0].numpy()
        ev = fields[0] != 0
        assert np.abs(eo[ev] - want[0][ev]).max() < 1e-4
        for row in obs[: meta[META["n_obs_pixels"]]]:
            ok = row[2:] != 0
            x = norm.denormalize(item["x"][None, :, row[0], row[1], None, None].double())[0, :, 0, 0]
            assert np.abs(x.numpy()[ok] - q.decode_c(row[2:])[ok]).max() < 1e-4
