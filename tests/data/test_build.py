"""Builder: round trip against an independent interpolation, restartability, refusals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from depthdif_hpc.data.build import build_store
from depthdif_hpc.data.grid import Tile
from depthdif_hpc.data.profiles import align_profile
from depthdif_hpc.data.readers import read_en4
from depthdif_hpc.data.store import META, StoreError, quantizer_from, read_manifest
from depthdif_hpc.data.stream import ShardStream
from depthdif_hpc.normalization import denormalize_temperature

from .conftest import TILE, tiny_config


def _files(store: Path, man: dict, kind: str, idx: int) -> Path:
    return store.parent / "sources" / kind / man["sources"][kind][idx]


def _xr_interp(path: Path, var: str, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    with xr.open_dataset(path) as ds:
        la = "latitude" if "latitude" in ds.dims else "lat"
        lo = "longitude" if "longitude" in ds.dims else "lon"
        return ds[var].isel(time=0).interp({la: lat, lo: lon}).values


def test_round_trip_matches_independent_interpolation(tiny_store):
    man = read_manifest(tiny_store)
    q = quantizer_from(man)
    bound = man["quantization"]["max_abs_error_c"]
    assert bound == pytest.approx(0.0005)
    g = zarr.open_group(str(tiny_store), mode="r")
    ds = ShardStream(tiny_store, "train", shuffle=False)
    checked_x = 0
    for split in ("train", "val"):
        meta = g[split]["meta"][:]
        for i in (0, meta.shape[0] - 1):
            m = meta[i]
            t = Tile(int(m[META["tile_id"]]), int(m[META["row0"]]), int(m[META["col0"]]), TILE, 0.1)
            lat, lon = t.pixel_lats(), t.pixel_lons()
            # y: GLORYS time-interpolated between the bracketing files, via xarray's interp.
            g0, g1 = m[META["glorys0"]], m[META["glorys1"]]
            d0 = int(_files(tiny_store, man, "glorys", g0).stem.split("_")[-1])
            y_ref = _xr_interp(_files(tiny_store, man, "glorys", g0), "thetao", lat, lon)
            if g1 >= 0:
                from depthdif_hpc.data.readers import yyyymmdd_to_day

                y1 = _xr_interp(_files(tiny_store, man, "glorys", g1), "thetao", lat, lon)
                dd0 = yyyymmdd_to_day(d0)
                dd1 = yyyymmdd_to_day(int(_files(tiny_store, man, "glorys", g1).stem.split("_")[-1]))
                w = (m[META["day"]] - dd0) / (dd1 - dd0)
                y_ref = (1 - w) * y_ref + w * y1
            fields = g[split]["fields"][i]
            y = q.decode_c(fields[1:])
            both = np.isfinite(y) & np.isfinite(y_ref)
            assert both.sum() > 0.99 * np.isfinite(y_ref).sum()
            assert np.abs(y[both] - y_ref[both]).max() <= bound + 2e-4  # + float32 interp
            eo_ref = _xr_interp(_files(tiny_store, man, "ostia", m[META["ostia0"]]),
                                "analysed_sst", lat, lon) - 273.15
            eo = q.decode_c(fields[0])
            both = np.isfinite(eo) & np.isfinite(eo_ref)
            assert both.sum() > 0.99 * np.isfinite(eo_ref).sum()
            assert np.abs(eo[both] - eo_ref[both]).max() <= bound + 2e-4
            # The streamed tensors are the same values, normalised (docs/model.md#normalization).
            if split == "train":
                item = ds.decoder.decode(i, fields, g[split]["obs"][i], m)
                yt = denormalize_temperature(item["y"]).numpy()
                vm = item["y_valid_mask"].numpy()
                np.testing.assert_array_equal(vm, np.isfinite(y))
                assert np.abs(yt[vm] - y[vm]).max() < 1e-4 and (item["y"].numpy()[~vm] == 0).all()
            # x: each observed pixel equals the average of the aligned profiles placed there.
            en4 = [read_en4(str(_files(tiny_store, man, "en4", f)))
                   for f in m[[META[f"en4_{k}"] for k in range(4)]] if f >= 0]
            obs = g[split]["obs"][i][: m[META["n_obs_pixels"]]]
            for row, col, *codes in obs[:3]:
                vals = []
                for p in en4:
                    near = np.abs(np.floor(p.juld) - m[META["day"]]) <= 3
                    r = np.floor((t.top - p.lat) / 0.1 + 1e-9)
                    c = np.floor(((p.lon - t.left) % 360) / 0.1 + 1e-9)
                    for k in np.flatnonzero(near & (r == row) & (c == col)):
                        vals.append(align_profile(p.depth[k], p.temp[k]))
                assert vals, f"no source profile for stored pixel {(row, col)}"
                with warnings.catch_warnings():  # levels no profile reached: NaN, as stored
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ref = np.nanmean(np.stack(vals), axis=0)
                got = q.decode_c(np.asarray(codes, np.uint16))
                np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
                assert np.nanmax(np.abs(got - ref)) <= bound + 1e-5
                checked_x += 1
    assert checked_x > 0
    assert man["splits"]["train"]["n_samples"] > 0 and man["splits"]["val"]["n_samples"] > 0


def test_manifest_records_profile_choices_and_pixel_platforms(tiny_store):
    man = read_manifest(tiny_store)
    prof = man["profiles"]
    assert prof["temperature"] == "potential" and prof["qc"] == "en4" and prof["qc_reject_flag"] == "4"
    assert set(prof["temperature_source"]) == {"POTM_CORRECTED"}
    assert prof["qc_rejected_levels"] > 0
    names = man["platforms"]
    assert len(names) > 3 and all(names)
    g = zarr.open_group(str(tiny_store), mode="r")
    checked = 0
    for split in ("train", "val"):
        meta, obs, plat = (g[split][k][:] for k in ("meta", "obs", "obs_platform"))
        for i in range(meta.shape[0]):
            n = meta[i, META["n_obs_pixels"]]
            assert (plat[i, n:] == -1).all() and (plat[i, :n, 0] >= 0).all()
        # Against the source files: each stored pixel lists exactly the floats whose profiles
        # (inside the +-3 day window, with any accepted level) fall into it.
        i = int(np.argmax(meta[:, META["n_obs_pixels"]]))
        m = meta[i]
        t = Tile(0, int(m[META["row0"]]), int(m[META["col0"]]), TILE, 0.1)
        en4 = [read_en4(str(_files(tiny_store, man, "en4", f)))
               for f in m[[META[f"en4_{k}"] for k in range(4)]] if f >= 0]
        for j in range(m[META["n_obs_pixels"]]):
            want = set()
            for p in en4:
                near = np.abs(np.floor(p.juld) - m[META["day"]]) <= 3
                r = np.floor((t.top - p.lat) / 0.1 + 1e-9)
                c = np.floor(((p.lon - t.left) % 360) / 0.1 + 1e-9)
                for k in np.flatnonzero(near & (r == obs[i, j, 0]) & (c == obs[i, j, 1])):
                    if np.isfinite(align_profile(p.depth[k], p.temp[k])).any():
                        want.add(str(p.platform[k]))
            got = {names[k] for k in plat[i, j] if k >= 0}
            assert got == want, (split, i, j)
            checked += 1
    assert checked > 0


def _arrays(store: Path) -> dict[str, np.ndarray]:
    g = zarr.open_group(str(store), mode="r")
    return {f"{s}/{n}": g[s][n][:] for s in ("train", "val")
            for n in ("fields", "obs", "meta", "obs_platform")}


def _assert_same_store(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma == mb
    xa, xb = _arrays(a), _arrays(b)
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


def test_killed_build_resumes_to_the_same_store(tiny_store, tiny_sources, tmp_path):
    out = tmp_path / "killed.zarr"
    cmd = [sys.executable, "-m", "depthdif_hpc.data.build", "--glorys", tiny_sources["glorys"],
           "--ostia", tiny_sources["ostia"], "--en4", tiny_sources["en4"], "--out", str(out),
           "--workers", "1", "--no-progress",
           "--set", f"dataset.grid.tile_size={TILE}", "--set", f"dataset.grid.patch_stride={TILE // 2}",
           "--set", "split.val_year=2018", "--set", "dataset.layout.shard_samples=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    units = out / "build" / "units"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if units.is_dir() and len(list(units.glob("*.json"))) >= 3:  # not the .tmp files
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "build finished before it could be killed"
    done = len(list(units.glob("*.json")))
    assert done >= 3
    with pytest.raises(StoreError, match="no manifest.json: the build is incomplete"):
        ShardStream(out, "train")
    cfg = tiny_config("dataset.layout.shard_samples=1")
    build_store(cfg, tiny_sources["glorys"], tiny_sources["ostia"], tiny_sources["en4"], out,
                workers=1, progress=False)
    ref = tmp_path / "ref.zarr"
    build_store(cfg, tiny_sources["glorys"], tiny_sources["ostia"], tiny_sources["en4"], ref,
                workers=2, progress=False)
    _assert_same_store(out, ref)


def test_partial_build_has_no_manifest_and_changed_inputs_are_refused(tiny_sources, tmp_path):
    out = tmp_path / "partial.zarr"
    cfg = tiny_config()
    build_store(cfg, tiny_sources["glorys"], tiny_sources["ostia"], tiny_sources["en4"], out,
                workers=1, progress=False, max_units=2)
    assert len(list((out / "build" / "units").glob("*.json"))) == 2
    assert not (out / "manifest.json").exists()
    with pytest.raises(StoreError, match="different sources/config"):
        build_store(tiny_config("dataset.grid.max_land_fraction=0.5"), tiny_sources["glorys"],
                    tiny_sources["ostia"], tiny_sources["en4"], out, workers=1, progress=False)
    build_store(cfg, tiny_sources["glorys"], tiny_sources["ostia"], tiny_sources["en4"], out,
                workers=1, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert man["stats"]["train_y_std_K"] > 1.0
    assert 270 < man["stats"]["train_y_mean_K"] < 300
