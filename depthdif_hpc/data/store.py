"""Layout, codecs, quantisation and manifest of the sharded Zarr v3 training store.

Layout (docs/data_store.md has the full description)::

    STORE/zarr.json                 root group
    STORE/manifest.json             written LAST, atomically: its presence means "complete"
    STORE/{train,val}/fields        (N, 51, H, W) uint16: channel 0 = eo, 1..50 = y
    STORE/{train,val}/obs           (N, P, 52) uint16: [row, col, 50 x codes] per observed pixel
    STORE/{train,val}/meta          (N, 17) int32: META_COLUMNS
    STORE/{train,val}/obs_platform  (N, P, 4) int32: platform ids of each obs row (-1 none)
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

from ..normalization import GLOBAL, KELVIN_OFFSET, TEMP_MEAN_K, TEMP_STD_K, Normalizer
from .profiles import PLATFORM_NONE, PLATFORM_SLOTS

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
        """(a, b) with normalised temperature = a * code + b (the z-score of
        docs/model.md#normalization), for code >= 1."""
        a = self.step / TEMP_STD_K
        b = (self.tmin - self.step + KELVIN_OFFSET - TEMP_MEAN_K) / TEMP_STD_K
        return np.float32(a), np.float32(b)

    def norm_affine_levels(self, norm: Normalizer) -> tuple[np.ndarray, np.ndarray]:
        """(a, b) per level, (D,) float32, for a per-level Normalizer (level 0 also serves eo)."""
        a = self.step / norm.std_k
        b = (self.tmin - self.step + KELVIN_OFFSET - norm.mean_k) / norm.std_k
        return a.astype(np.float32), b.astype(np.float32)


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
        # Platform ids (indices into manifest.platforms) of each obs row: whole-float holdout.
        "obs_platform": ((n, layout.max_obs_pixels, PLATFORM_SLOTS), "int32",
                         (min(s, max(n, 1)), layout.max_obs_pixels, PLATFORM_SLOTS)),
    }
    for name, (shape, dtype, chunks) in specs.items():
        fill = PLATFORM_NONE if name == "obs_platform" else 0
        if name in grp:
            if tuple(grp[name].shape) != shape:
                raise StoreError(f"{root.store}: {split}/{name} exists with shape "
                                 f"{tuple(grp[name].shape)}, expected {shape}")
            continue
        if n == 0:
            grp.create_array(name, shape=shape, dtype=dtype, chunks=(1,) + shape[1:], fill_value=fill)
            continue
        # Small arrays compress better with zstd and their decode time does not matter.
        base = comp if name == "fields" else [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")]
        grp.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                         shards=(min(s, n),) + shape[1:], compressors=base + check, fill_value=fill)


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


# Per-level std floor, degC: a nearly constant abyssal level would otherwise turn the 0.001 degC
# quantisation step (and sensor noise) into large model-space steps; at 0.05 one step is 0.02.
MIN_LEVEL_STD_C = 0.05


def level_stats(man: dict) -> tuple[list[float], list[float]]:
    """Per-level train mean and std (degC) from a manifest, for per-level normalisation.

    Levels without any valid train pixel (below the deepest sea floor) take the statistics of
    the deepest level that has some (nothing there is ever valid, so any finite value works);
    every std is at least MIN_LEVEL_STD_C.
    """
    st = man["stats"]
    mean = np.asarray(st["train_y_level_mean_c"], np.float64)
    std = np.asarray(st["train_y_level_std_c"], np.float64)
    count = np.asarray(st["train_y_level_count"], np.float64)
    has = np.flatnonzero(count > 0)
    if not has.size:
        raise StoreError("the store's train split has no valid temperature: no per-level statistics")
    fill = np.maximum.accumulate(np.where(count > 0, np.arange(count.size), has[0]))
    return mean[fill].tolist(), np.maximum(std[fill], MIN_LEVEL_STD_C).tolist()


def resolve_normalizer(cfg: Any) -> Normalizer:
    """The Normalizer `dataset.normalization` asks for. per_level takes the config's statistics,
    or, when those are empty, the manifest of `dataset.store` (level_stats) and writes them into
    the config, so a checkpoint's config carries what the model was trained with."""
    d = cfg.dataset
    if d.normalization == "global":
        return GLOBAL
    if not d.normalization_mean_c:
        if not d.store:
            raise StoreError("dataset.normalization=per_level needs the per-level statistics: set "
                             "dataset.store (its manifest has them) or dataset.normalization_mean_c"
                             "/normalization_std_c")
        d.normalization_mean_c, d.normalization_std_c = level_stats(read_manifest(d.store))
    return Normalizer.per_level(d.normalization_mean_c, d.normalization_std_c)


def quantizer_from(man: dict) -> Quantizer:
    q = man["quantization"]
    return Quantizer(float(q["step_c"]), float(q["min_c"]))


def meta_coords(meta: np.ndarray) -> np.ndarray:
    """(n, 2) float32 [lat, lon] from the bit-cast meta columns."""
    return np.ascontiguousarray(meta[:, [META["lat_bits"], META["lon_bits"]]]).view(np.float32)


_EMPTY = np.uint64(2**64 - 1)


class ShardReader:
    """Direct reader of one sharded array of a local store (the read hot path).

    zarr's generic pipeline costs about as much per inner chunk as decompressing it; this
    reads the zarr v3 shard format itself (index of (offset, nbytes) uint64 pairs + crc32c at
    the end of each shard file) and Blosc-decompresses chunks straight into the output. It
    only accepts the layout this package writes (checked against zarr.json) and the caller
    falls back to zarr for anything else. Errors are ValueError/OSError with the reason;
    the caller names shard and sample.
    """

    def __init__(self, array_dir: Path):
        meta = json.loads((array_dir / "zarr.json").read_text())
        (codec,) = meta["codecs"]
        if codec["name"] != "sharding_indexed":
            raise ValueError("not sharded")
        cfg = codec["configuration"]
        if cfg.get("index_location", "end") != "end":
            raise ValueError("index not at the end")
        names = [c["name"] for c in cfg["codecs"]]
        if names not in (["bytes", "blosc"], ["bytes", "blosc", "crc32c"]):
            raise ValueError(f"codecs {names}")
        if cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            raise ValueError("big endian")
        if [c["name"] for c in cfg["index_codecs"]] != ["bytes", "crc32c"]:
            raise ValueError("index codecs")
        self.dir = array_dir
        self.shape = tuple(meta["shape"])
        self.dtype = np.dtype(meta["data_type"])
        self.shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        self.inner = tuple(cfg["chunk_shape"])
        if self.shard[1:] != self.shape[1:] or self.inner[1:] != self.shape[1:]:
            raise ValueError("sharded along more than the sample axis")
        self.per_shard = self.shard[0] // self.inner[0]
        self.chunk_crc = names[-1] == "crc32c"
        self.fill = meta.get("fill_value", 0)

    def shard_path(self, shard: int) -> Path:
        return self.dir / "c" / str(shard) / Path(*(["0"] * (len(self.shape) - 1)))

    def read(self, a: int, b: int) -> np.ndarray:
        """Rows a..b-1, which must lie in one shard."""
        import google_crc32c
        from numcodecs import blosc

        shard = a // self.shard[0]
        if (b - 1) // self.shard[0] != shard:
            raise ValueError(f"rows {a}..{b - 1} span shards")
        c = self.inner[0]
        k0 = (a - shard * self.shard[0]) // c
        k1 = (b - 1 - shard * self.shard[0]) // c + 1
        out = np.empty((k1 - k0) * c * int(np.prod(self.shape[1:])), self.dtype)
        chunk_n = c * int(np.prod(self.shape[1:]))
        isz = self.per_shard * 16
        with open(self.shard_path(shard), "rb") as f:
            size = f.seek(0, 2)
            if size < isz + 4:
                raise ValueError(f"shard file is {size} bytes, shorter than its index")
            f.seek(size - isz - 4)
            raw = f.read(isz + 4)
            if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise ValueError("shard index checksum mismatch (truncated or damaged file)")
            index = np.frombuffer(raw[:-4], "<u8").reshape(self.per_shard, 2)[k0:k1]
            present = index[:, 0] != _EMPTY
            if np.any(index[present, 0] + index[present, 1] > size - isz - 4):
                raise ValueError("chunk extends past the shard's data (truncated file)")
            if present.any():
                lo = int(index[present, 0].min())
                hi = int((index[present, 0] + index[present, 1]).max())
                f.seek(lo)
                buf = memoryview(f.read(hi - lo))
            for j in range(k1 - k0):
                dst = out[j * chunk_n:(j + 1) * chunk_n]
                if not present[j]:
                    dst[...] = self.fill
                    continue
                off, nb = int(index[j, 0]) - lo, int(index[j, 1])
                src = buf[off:off + nb]
                if self.chunk_crc:
                    if google_crc32c.value(bytes(src[:-4])) != int.from_bytes(src[-4:], "little"):
                        raise ValueError(f"chunk {k0 + j} checksum mismatch")
                    src = src[:-4]
                # Blosc1 header: bytes 4..8 uncompressed size, 12..16 compressed size.
                nbytes = int.from_bytes(src[4:8], "little") if nb >= 16 else -1
                cbytes = int.from_bytes(src[12:16], "little") if nb >= 16 else -1
                if nbytes != dst.nbytes or cbytes != len(src):
                    raise ValueError(f"chunk {k0 + j} has a bad Blosc header (sizes {nbytes}/"
                                     f"{cbytes}, expected {dst.nbytes}/{len(src)})")
                blosc.decompress(src, dst)
        rows = out.reshape(((k1 - k0) * c,) + self.shape[1:])
        first = a - shard * self.shard[0] - k0 * c
        return rows[first:first + (b - a)]
