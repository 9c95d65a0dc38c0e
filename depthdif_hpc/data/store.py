"""Layout, codecs, quantisation and manifest of the sharded Zarr v3 training store.

Layout (docs/data_store.md has the full description)::

    STORE/zarr.json                 root group
    STORE/manifest.json             written LAST, atomically: its presence means "complete"
    STORE/{train,val}/fields        (N, 51, H, W) uint16: channel 0 = eo, 1..50 = y
    STORE/{train,val}/obs           (N, P, 52) uint16: [row, col, 50 x codes] per observed pixel
    STORE/{train,val}/meta          (N, 17) int32: META_COLUMNS
    STORE/build/                    plan and per-unit progress markers of the builder

Temperatures are uint16 codes: 0 = invalid, k >= 1 = quant_min_c + (k - 1) * quant_step_c
(degC), so the validity masks cost nothing and the error is at most step/2. Every array is
sharded along the sample axis with `shard_samples` samples per shard file and one sample per
inner chunk, so a sample can be read alone and a build unit writes whole shards only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..normalization import KELVIN_OFFSET, TEMP_MEAN_K, TEMP_STD_K

FORMAT = "depthdif-store/1"
SPLITS = ("train", "val")
N_LEVELS = 50
META_COLUMNS = ("date", "day", "tile_id", "lat_bits", "lon_bits", "glorys0", "glorys1",
                "ostia0", "ostia1", "en4_0", "en4_1", "en4_2", "en4_3", "n_profiles",
                "n_obs_pixels", "row0", "col0")
META = {name: i for i, name in enumerate(META_COLUMNS)}
MANIFEST = "manifest.json"


class StoreError(RuntimeError):
    """The store is missing, incomplete, incompatible or damaged; the message says where."""


class CorruptSampleError(StoreError):
    """A shard or chunk could not be read; names store, split, array, shard and sample."""


@dataclass(frozen=True)
class Quantizer:
    """degC <-> uint16 codes (0 = invalid)."""

    step: float
    tmin: float

    @property
    def max_c(self) -> float:
        return self.tmin + 65534 * self.step

    def encode(self, temp_c: np.ndarray) -> tuple[np.ndarray, int]:
        """Codes and the number of finite values clipped into range."""
        finite = np.isfinite(temp_c)
        k = np.rint((np.where(finite, temp_c, self.tmin) - self.tmin) / self.step)
        clipped = int(np.count_nonzero(finite & ((k < 0) | (k > 65534))))
        codes = (np.clip(k, 0, 65534) + 1).astype(np.uint16)
        codes[~finite] = 0
        return codes, clipped

    def decode_c(self, codes: np.ndarray) -> np.ndarray:
        out = (self.tmin + (codes.astype(np.float64) - 1) * self.step).astype(np.float32)
        out[codes == 0] = np.nan
        return out

    def norm_affine(self) -> tuple[np.float32, np.float32]:
        """(a, b) with normalised temperature = a * code + b (SPEC 1 z-score), for code >= 1."""
        a = self.step / TEMP_STD_K
        b = (self.tmin - self.step + KELVIN_OFFSET - TEMP_MEAN_K) / TEMP_STD_K
        return np.float32(a), np.float32(b)


def codecs_for(layout: Any) -> tuple[list, list]:
    """(compressors, checksum codecs) for zarr.create_array from a StoreLayoutConfig."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    comp = [BloscCodec(cname=layout.compressor, clevel=layout.clevel, shuffle=layout.shuffle)]
    return comp, ([Crc32cCodec()] if layout.checksum else [])


def create_split_arrays(root: Any, split: str, n: int, tile: int, layout: Any) -> None:
    """Create (or keep, if already created with the same shape) one split's arrays."""
    from zarr.codecs import BloscCodec

    grp = root.require_group(split)
    s = layout.shard_samples
    comp, check = codecs_for(layout)
    specs = {
        "fields": ((n, 1 + N_LEVELS, tile, tile), "uint16", (1, 1 + N_LEVELS, tile, tile)),
        # obs is small and mostly zeros: one chunk per shard (per-chunk overhead dominates).
        "obs": ((n, layout.max_obs_pixels, 2 + N_LEVELS), "uint16",
                (min(s, max(n, 1)), layout.max_obs_pixels, 2 + N_LEVELS)),
        # meta is tiny: one chunk per shard keeps its per-chunk overhead off the read path.
        "meta": ((n, len(META_COLUMNS)), "int32", (min(s, max(n, 1)), len(META_COLUMNS))),
    }
    for name, (shape, dtype, chunks) in specs.items():
        if name in grp:
            if tuple(grp[name].shape) != shape:
                raise StoreError(f"{root.store}: {split}/{name} exists with shape "
                                 f"{tuple(grp[name].shape)}, expected {shape}")
            continue
        if n == 0:
            grp.create_array(name, shape=shape, dtype=dtype, chunks=(1,) + shape[1:], fill_value=0)
            continue
        # Small arrays compress better with zstd and their decode time does not matter.
        base = comp if name == "fields" else [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
        grp.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                         shards=(min(s, n),) + shape[1:], compressors=base + check, fill_value=0)


def shard_file(store: Path, split: str, name: str, ndim: int, shard: int) -> Path:
    """Path of one shard file under zarr v3's default chunk key encoding."""
    return store / split / name / "c" / str(shard) / Path(*(["0"] * (ndim - 1)))


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(store: str | Path) -> dict:
    """The manifest of a complete store, or StoreError saying why the store is not usable."""
    store = Path(store)
    path = store / MANIFEST
    if not store.exists():
        raise StoreError(f"store {store} does not exist")
    if not path.is_file():
        raise StoreError(f"store {store} has no {MANIFEST}: the build is incomplete (or this is "
                         "not a depthdif store); rerun depthdif_hpc.data.build to finish it")
    try:
        man = json.loads(path.read_text())
    except ValueError as exc:
        raise StoreError(f"{path}: unreadable manifest: {exc}") from exc
    if man.get("format") != FORMAT:
        raise StoreError(f"{path}: format {man.get('format')!r}, this code reads {FORMAT!r}")
    return man


def quantizer_from(man: dict) -> Quantizer:
    q = man["quantization"]
    return Quantizer(float(q["step_c"]), float(q["min_c"]))


def meta_coords(meta: np.ndarray) -> np.ndarray:
    """(n, 2) float32 [lat, lon] from the bit-cast meta columns."""
    return np.ascontiguousarray(meta[:, [META["lat_bits"], META["lon_bits"]]]).view(np.float32)
