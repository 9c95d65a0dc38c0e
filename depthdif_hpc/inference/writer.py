"""The prediction store: a Zarr v3 group that xarray opens as a CF-style dataset.

Layout (N samples of one split, D depth levels, H x W pixels, K ensemble members)::

    OUT.zarr/mean       (sample, depth, y, x)          float32 degC, NaN outside y_valid
    OUT.zarr/std        (sample, depth, y, x)          float32 degC, ensemble spread (K > 1)
    OUT.zarr/members    (sample, member, depth, y, x)  float32 degC (only with --members)
    OUT.zarr/withheld   (sample, y, x)                 uint8, 1 = profile hidden from the condition
    OUT.zarr/done       (sample,)                      uint8, 1 once the sample's data is written
    OUT.zarr/depth, lat (sample, y), lon (sample, x), date (sample,), sample_id (sample,)

One sample per chunk, so ranks write disjoint chunks without coordination, and `done` is set
only after a sample's arrays are written: a rerun redoes exactly the samples without it.
The group is created under a temporary name and renamed into place, so a crash during creation
never leaves a store that opens.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

TEMP_ATTRS = {
    "units": "degC",
    "standard_name": "sea_water_potential_temperature",
    "long_name": "DepthDif reconstruction of potential temperature",
}
FORMAT = "depthdif-predictions/1"
# What outputs written before a setting was recorded had for it: every earlier run sampled in
# fp32. A resume checks a missing setting against this value, and accepts any other missing one.
IMPLIED_SETTINGS = {"precision": "fp32"}


def check_prediction_store(
    out: str | Path, *, n: int, depth_m: list[float], height: int, width: int,
    attrs: dict | None = None,
) -> bool:
    """False if `out` does not exist yet; True if it exists and this run may resume it: its
    shape and `attrs` (but the source store's path, which may move) are this run's. A resumed
    run with another sampler, seed, ensemble, withholding or precision would fill it with
    samples of two methods: ValueError naming the first setting that differs. Read-only, so
    every rank checks before the first barrier (one rank raising alone would leave the others
    waiting there until the collective timeout)."""
    out = Path(out)
    if not (out / "zarr.json").is_file():
        return False
    g = zarr.open_group(str(out), mode="r")
    have = g["mean"].shape
    if g.attrs.get("format") != FORMAT or have != (n, len(depth_m), height, width):
        raise ValueError(f"{out} exists with shape {have} (format {g.attrs.get('format')}); "
                         f"expected ({n}, {len(depth_m)}, {height}, {width}): remove it or "
                         "choose another --out")
    for key, value in (attrs or {}).items():
        old = g.attrs.get(key, IMPLIED_SETTINGS.get(key, value))
        if key != "source_store" and old != json.loads(json.dumps(value)):
            raise ValueError(f"{out} was written with {key} = {old!r}, this run has {value!r}: "
                             "resume it with the same settings, or choose another --out")
    return True


def create_prediction_store(
    out: str | Path,
    *,
    n: int,
    depth_m: list[float],
    height: int,
    width: int,
    members: int = 0,
    attrs: dict | None = None,
) -> Path:
    """Create the empty store (or keep an existing compatible one, `check_prediction_store`)
    and return its path."""
    out = Path(out)
    if check_prediction_store(out, n=n, depth_m=depth_m, height=height, width=width, attrs=attrs):
        return out
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    g = zarr.open_group(str(tmp), mode="w")
    g.attrs.update({"format": FORMAT, "Conventions": "CF-1.8", **(attrs or {})})
    d = len(depth_m)
    field = dict(dtype="float32", fill_value=np.nan)
    g.create_array("mean", shape=(n, d, height, width), chunks=(1, d, height, width),
                   dimension_names=["sample", "depth", "y", "x"],
                   attributes={**TEMP_ATTRS, "coordinates": "lat lon date"}, **field)
    g.create_array("std", shape=(n, d, height, width), chunks=(1, d, height, width),
                   dimension_names=["sample", "depth", "y", "x"],
                   attributes={"units": "degC", "long_name": "ensemble standard deviation"}, **field)
    if members:
        g.create_array("members", shape=(n, members, d, height, width),
                       chunks=(1, members, d, height, width),
                       dimension_names=["sample", "member", "depth", "y", "x"],
                       attributes=TEMP_ATTRS, **field)
    g.create_array("withheld", shape=(n, height, width), chunks=(1, height, width), dtype="uint8",
                   fill_value=0, dimension_names=["sample", "y", "x"],
                   attributes={"long_name": "profile columns hidden from the condition"})
    g.create_array("done", shape=(n,), chunks=(1,), dtype="uint8", fill_value=0,
                   dimension_names=["sample"])
    g.create_array("depth", data=np.asarray(depth_m, np.float32), dimension_names=["depth"],
                   attributes={"units": "m", "positive": "down", "standard_name": "depth"})
    g.create_array("lat", shape=(n, height), chunks=(1, height), dtype="float32", fill_value=np.nan,
                   dimension_names=["sample", "y"],
                   attributes={"units": "degrees_north", "standard_name": "latitude"})
    g.create_array("lon", shape=(n, width), chunks=(1, width), dtype="float32", fill_value=np.nan,
                   dimension_names=["sample", "x"],
                   attributes={"units": "degrees_east", "standard_name": "longitude"})
    g.create_array("date", shape=(n,), chunks=(1,), dtype="int64", fill_value=0,
                   dimension_names=["sample"], attributes={"long_name": "date as YYYYMMDD"})
    g.create_array("sample_id", shape=(n,), chunks=(1,), dtype="int64", fill_value=-1,
                   dimension_names=["sample"])
    try:
        os.rename(tmp, out)
    except OSError:
        # another rank created it first; use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "zarr.json").is_file():
            raise
    return out


class PredictionWriter:
    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        self.group = zarr.open_group(str(self.path), mode="r+")

    def done(self) -> np.ndarray:
        return self.group["done"][:].astype(bool)

    def write(self, index: int, *, mean: np.ndarray, std: np.ndarray, members: np.ndarray | None,
              withheld: np.ndarray, lat: np.ndarray, lon: np.ndarray, date: int, sample_id: int) -> None:
        g = self.group
        g["mean"][index] = mean
        g["std"][index] = std
        if members is not None and "members" in g:
            g["members"][index] = members
        g["withheld"][index] = withheld.astype(np.uint8)
        g["lat"][index] = lat
        g["lon"][index] = lon
        g["date"][index] = date
        g["sample_id"][index] = sample_id
        g["done"][index] = 1  # last: the sample counts only once everything above is on disk
