"""Build the sharded Zarr training store from GLORYS, OSTIA and EN4 NetCDF files.

    python -m depthdif_hpc.data.build --glorys GLOB --ostia GLOB --en4 GLOB --out STORE
        [--config data_config.yaml ...] [--set key=value ...] [--workers N] [--max-units N]
        [--overwrite]

Steps: scan the sources; lay the 0.1 degree patch grid over what they cover (tile/stride,
land-fraction filter with forced regions; land = GLORYS surface invalid); list the samples
(patch, OSTIA day inside the GLORYS time range), keep those with EN4 support within
+-temporal_window_days//2 days, split them by year; then compute them in work units of
`shard_samples` samples (one shard of every array), in parallel, and write each unit's shards
followed by a progress marker. A killed build resumes from the markers; the manifest that
makes the store usable is written last, atomically. The sample list, sources and config are
hashed into the plan, so a resume with different inputs is refused.
"""

from __future__ import annotations

import argparse
import glob as globmod
import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..command import command
from ..config import Config, load_config, to_dict
from .grid import Tile, candidate_tiles, in_box
from .profiles import (
    GLORYS_DEPTHS,
    PLATFORM_NONE,
    PLATFORM_SLOTS,
    align_profiles,
    pixel_of,
    pixel_platforms,
    rasterize,
)
from .readers import (
    GridSource,
    SourceError,
    contract_date,
    day_to_yyyymmdd,
    read_en4,
    yyyymmdd_to_day,
)
from .store import (
    FORMAT,
    MANIFEST,
    META,
    META_COLUMNS,
    N_LEVELS,
    SPLITS,
    Quantizer,
    StoreError,
    create_split_arrays,
    read_manifest,
    write_json_atomic,
)


def expand(pattern: str | list[str], what: str) -> list[str]:
    files = sorted(set(pattern)) if isinstance(pattern, list) else sorted(globmod.glob(pattern))
    if not files:
        raise SourceError(f"--{what} {pattern!r} matches no files")
    return files


@dataclass
class _EN4Index:
    files: list[str]
    file_idx: np.ndarray
    prof_idx: np.ndarray
    day: np.ndarray  # floor(JULD)
    lat: np.ndarray
    lon: np.ndarray
    platform: np.ndarray  # int32 index into platforms
    platforms: list[str]  # sorted distinct platform ids of all files ("" = none given)
    reader: dict[str, Any]  # read_en4 keyword arguments (temperature variable, QC)
    summary: dict[str, Any]  # temperature source per file count, QC rejections


def en4_reader_options(cfg: Config) -> dict[str, Any]:
    """read_en4 keyword arguments from dataset.sampling."""
    s = cfg.dataset.sampling
    return {"temp_var": s.argo_temp_var_name, "depth_var": s.argo_depth_var_name,
            "temperature": s.argo_temperature, "potm_var": s.argo_potm_var_name,
            "psal_var": s.argo_psal_var_name, "qc": s.argo_qc}


@dataclass
class Context:
    """Everything a work unit needs; built once in the parent and inherited by forked workers."""

    cfg: Config
    glorys: GridSource | None  # None: inference inputs without GLORYS (y codes stay 0)
    ostia: GridSource
    en4: _EN4Index
    tiles: dict[int, Tile]
    plans: dict[str, np.ndarray]  # split -> (N, 2) [day, tile_id]
    quant: Quantizer
    _aligned: dict | None = None

    def aligned(self, fi: int) -> np.ndarray:
        """(P, 50) aligned profiles of one EN4 file, cached per process."""
        if self._aligned is None:
            self._aligned = {}
        a = self._aligned.get(fi)
        if a is None:
            if len(self._aligned) >= 4:
                self._aligned.pop(next(iter(self._aligned)))
            p = read_en4(self.en4.files[fi], **self.en4.reader)
            a = self._aligned[fi] = align_profiles(p.depth, p.temp, GLORYS_DEPTHS)
        return a


# ------------------------------------------------------------------------------------------
# Planning
# ------------------------------------------------------------------------------------------


def _index_en4(files: list[str], cfg: Config) -> _EN4Index:
    fi, pi, day, lat, lon, plat = [], [], [], [], [], []
    reader = en4_reader_options(cfg)
    summary: dict[str, Any] = {"temperature_source": {}, "qc_rejected_profiles": 0,
                               "qc_rejected_levels": 0}
    for k, path in enumerate(files):
        # Profile flags apply here already, so rejected profiles never count as support.
        p = read_en4(path, positions_only=True, **reader)
        n = p.juld.size
        fi.append(np.full(n, k, np.int32))
        pi.append(np.arange(n, dtype=np.int32))
        day.append(np.floor(p.juld + 1e-9).astype(np.int64))
        lat.append(p.lat)
        lon.append(p.lon)
        plat.append(p.platform)
        src = summary["temperature_source"]
        src[p.temperature_source] = src.get(p.temperature_source, 0) + 1
        summary["qc_rejected_profiles"] += p.qc_rejected_profiles
        summary["qc_rejected_levels"] += p.qc_rejected_levels
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    names = np.concatenate(plat) if plat else np.zeros(0, str)
    platforms, pid = np.unique(names, return_inverse=True)
    idx = _EN4Index(files, cat(fi, np.int32), cat(pi, np.int32), cat(day, np.int64),
                    cat(lat, np.float64), cat(lon, np.float64), pid.astype(np.int32).ravel(),
                    [str(x) for x in platforms], reader, summary)
    # Sorted by day (stable: file order within a day) so a window is a searchsorted slice.
    order = np.argsort(idx.day, kind="stable")
    for name in ("file_idx", "prof_idx", "day", "lat", "lon", "platform"):
        setattr(idx, name, getattr(idx, name)[order])
    return idx


def _window(en4: _EN4Index, day: int, radius: int) -> np.ndarray:
    """Indices of profiles dated within day +- radius (calendar days)."""
    a = np.searchsorted(en4.day, day - radius, side="left")
    b = np.searchsorted(en4.day, day + radius, side="right")
    return np.arange(a, b)


def select_tiles(cfg: Config, glorys: GridSource, ostia: GridSource) -> list[Tile]:
    """Tiles covered by both gridded sources, inside bbox, passing the land-fraction rule."""
    g = cfg.dataset.grid
    day0 = glorys.entries[0][0]
    kept = []
    lat_range = (max(glorys.grid.lats[0], ostia.grid.lats[0]),
                 min(glorys.grid.lats[-1], ostia.grid.lats[-1]))
    for t in candidate_tiles(g.tile_size, g.patch_stride, g.resolution_deg, lat_range):
        lats, lons = t.pixel_lats(), t.pixel_lons()
        if g.bbox:
            lo0, lo1, la0, la1 = g.bbox
            if not (in_box(t.top, t.left + 1e-9, lo0, lo1, la0, la1)
                    and in_box(t.bottom, t.right - 1e-9, lo0, lo1, la0, la1)):
                continue
        if not (glorys.covers(lats, lons) and ostia.covers(lats, lons)):
            continue
        surface = glorys.interp(day0, lats, lons, levels=slice(0, 1))[0]
        land = float(np.mean(~np.isfinite(surface)))
        lat_c, lon_c = t.centre()
        ok = land <= g.max_land_fraction
        for r in g.force_include_regions:
            if in_box(lat_c, lon_c, r.lon_min, r.lon_max, r.lat_min, r.lat_max):
                ok = ok or land <= r.max_land_fraction
        if ok:
            kept.append(t)
    return kept


def plan_samples(cfg: Config, days: np.ndarray, tiles: list[Tile], en4: _EN4Index
                 ) -> dict[str, np.ndarray]:
    """(N, 2) [day, tile_id] per split, ordered by day then tile."""
    radius = cfg.dataset.sampling.temporal_window_days // 2
    sel = cfg.dataset.selection
    rows: dict[str, list] = {s: [] for s in SPLITS}
    for d in days:
        near = _window(en4, int(d), radius)
        plat, plon = en4.lat[near], en4.lon[near]
        split = "val" if (cfg.split.val_year is not None
                          and day_to_yyyymmdd(int(d)) // 10000 == cfg.split.val_year) else "train"
        need = sel.require_argo_for_val if split == "val" else sel.require_argo_for_train
        for t in tiles:
            if need:
                _, _, inside = pixel_of(plat, plon, t.top, t.left, t.res, t.size)
                if not inside.any():
                    continue
            rows[split].append((int(d), t.tile_id))
    return {s: np.array(r, dtype=np.int64).reshape(-1, 2) for s, r in rows.items()}


def sample_days(cfg: Config, glorys: GridSource, ostia: GridSource) -> np.ndarray:
    """OSTIA days inside the GLORYS time range and the configured date range."""
    gd = glorys.days
    days = ostia.days[(ostia.days >= gd[0]) & (ostia.days <= gd[-1])]
    sel = cfg.dataset.selection
    if sel.start_date:
        days = days[days >= yyyymmdd_to_day(sel.start_date)]
    if sel.end_date:
        days = days[days <= yyyymmdd_to_day(sel.end_date)]
    return days


def open_sources(cfg: Config, glorys: str | list[str] | None, ostia: str | list[str],
                 en4: str | list[str]) -> Context:
    """The scanned sources, without tiles or a sample plan: what `grid_sample` needs.

    `glorys` None is for inference inputs (depthdif_hpc.inference.reconstruct), which grid
    OSTIA and EN4 through the same code as the store."""
    s = cfg.dataset.sampling
    g_src = GridSource.scan(expand(glorys, "glorys"), s.glorys_var_name, "glorys") if glorys else None
    o_src = GridSource.scan(expand(ostia, "ostia"), s.ostia_var_name, "ostia")
    e_idx = _index_en4(expand(en4, "en4"), cfg)
    lay = cfg.dataset.layout
    return Context(cfg, g_src, o_src, e_idx, {}, {}, Quantizer(lay.quant_step_c, lay.quant_min_c))


def make_context(cfg: Config, glorys: str | list[str], ostia: str | list[str], en4: str | list[str]
                 ) -> Context:
    ctx = open_sources(cfg, glorys, ostia, en4)
    g_src, o_src = ctx.glorys, ctx.ostia
    tiles = select_tiles(cfg, g_src, o_src)
    g_src.close()
    o_src.close()
    if not tiles:
        raise SourceError("no patch tile is covered by both the GLORYS and OSTIA files and passes "
                          "the land-fraction filter (check dataset.grid and the files' regions)")
    days = sample_days(cfg, g_src, o_src)
    ctx.tiles = {t.tile_id: t for t in tiles}
    ctx.plans = plan_samples(cfg, days, tiles, ctx.en4)
    return ctx


def plan_hash(ctx: Context) -> str:
    d = to_dict(ctx.cfg)["dataset"]
    d.pop("store", None)
    d.pop("sources", None)
    h = hashlib.sha256()
    h.update(json.dumps({"dataset": d, "val_year": ctx.cfg.split.val_year, "format": FORMAT},
                        sort_keys=True).encode())
    for src in (ctx.glorys.files, ctx.ostia.files, ctx.en4.files):
        for f in src:
            h.update(f"{os.path.basename(f)}:{os.path.getsize(f)}".encode())
    for s in SPLITS:
        h.update(ctx.plans[s].tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# Work units
# ------------------------------------------------------------------------------------------


@dataclass
class RawSample:
    """One sample exactly as the store holds it (`Decoder` turns it into the batch), plus
    what went into it."""

    fields: np.ndarray  # (1 + N_LEVELS, H, W) uint16 codes: eo, then y (all 0 without GLORYS)
    obs: np.ndarray  # (max_obs_pixels, 2 + N_LEVELS) uint16: row, col, x codes
    meta: np.ndarray  # (len(META_COLUMNS),) int32
    stats: dict[str, Any]  # this sample's share of the unit statistics
    profiles: np.ndarray  # indices into ctx.en4 of the profiles inside the tile and window
    # (max_obs_pixels, PLATFORM_SLOTS) int32: platform ids of each obs row (profiles.pixel_platforms)
    obs_platform: np.ndarray | None = None


def grid_sample(ctx: Context, day: int, t: Tile) -> RawSample:
    """Grid the sources for one tile and day: the store builder's per-sample step, also used
    for inference inputs, so training and inference see the same gridding and alignment."""
    lay = ctx.cfg.dataset.layout
    size = t.size
    fields = np.zeros((1 + N_LEVELS, size, size), np.uint16)
    obs = np.zeros((lay.max_obs_pixels, 2 + N_LEVELS), np.uint16)
    meta = np.zeros(len(META_COLUMNS), np.int32)
    stats: dict[str, Any] = {"count": np.zeros(N_LEVELS), "sum": np.zeros(N_LEVELS),
                             "sumsq": np.zeros(N_LEVELS), "clipped": 0, "dropped_obs_pixels": 0,
                             "obs_pixels": 0, "profiles": 0}
    radius = ctx.cfg.dataset.sampling.temporal_window_days // 2
    e = ctx.en4
    lats, lons = t.pixel_lats(), t.pixel_lons()
    eo = ctx.ostia.interp(day, lats, lons)
    codes, c1 = ctx.quant.encode(eo)
    fields[0] = codes
    stats["clipped"] += c1
    if ctx.glorys is not None:
        y = ctx.glorys.interp(day, lats, lons)
        codes, c2 = ctx.quant.encode(y)
        fields[1:] = codes
        stats["clipped"] += c2
        fin = np.isfinite(y)
        y0 = np.where(fin, y, 0.0).astype(np.float64)
        stats["count"] += fin.sum(axis=(1, 2))
        stats["sum"] += y0.sum(axis=(1, 2))
        stats["sumsq"] += (y0 * y0).sum(axis=(1, 2))
    # Profiles within +-radius days and inside the patch (half-open, dateline-aware).
    near = _window(e, day, radius)
    r, c, inside = pixel_of(e.lat[near], e.lon[near], t.top, t.left, t.res, t.size)
    near, r, c = near[inside], r[inside], c[inside]
    files = sorted(set(e.file_idx[near].tolist()))
    if near.size:
        aligned = np.concatenate([ctx.aligned(f)[e.prof_idx[near[e.file_idx[near] == f]]]
                                  for f in files])
        order = np.concatenate([np.flatnonzero(e.file_idx[near] == f) for f in files])
        pix, vals = rasterize(aligned, r[order], c[order])
        plat = pixel_platforms(aligned, r[order], c[order], e.platform[near][order])
    else:
        pix, vals = rasterize(np.zeros((0, N_LEVELS), np.float32), r, c)
        plat = np.zeros((0, PLATFORM_SLOTS), np.int32)
    keep = min(pix.shape[0], lay.max_obs_pixels)
    stats["dropped_obs_pixels"] += pix.shape[0] - keep
    stats["obs_pixels"] += keep
    stats["profiles"] += int(near.size)
    obs[:keep, 0:2] = pix[:keep]
    obs_platform = np.full((lay.max_obs_pixels, PLATFORM_SLOTS), PLATFORM_NONE, np.int32)
    obs_platform[:keep] = plat[:keep]
    codes, c3 = ctx.quant.encode(vals[:keep])
    obs[:keep, 2:] = codes
    stats["clipped"] += c3
    lat_c, lon_c = t.centre()
    m = meta
    m[META["date"]] = contract_date(day)
    m[META["day"]] = day
    m[META["tile_id"]] = t.tile_id
    m[[META["lat_bits"], META["lon_bits"]]] = np.array([lat_c, lon_c], np.float32).view(np.int32)
    gb = ([fi for (_, fi, _), _w in ctx.glorys.bracket(day)] if ctx.glorys is not None else []) + [-1, -1]
    ob = [fi for (_, fi, _), _w in ctx.ostia.bracket(day)] + [-1]
    m[META["glorys0"]], m[META["glorys1"]] = gb[0], gb[1]
    m[META["ostia0"]], m[META["ostia1"]] = ob[0], ob[1]
    for j in range(4):
        m[META[f"en4_{j}"]] = files[j] if j < len(files) else -1
    m[META["n_profiles"]] = int(near.size)
    m[META["n_obs_pixels"]] = keep
    m[META["row0"]], m[META["col0"]] = t.row0, t.col0
    return RawSample(fields, obs, meta, stats, near, obs_platform)


def compute_unit(ctx: Context, split: str, unit: int) -> dict[str, Any]:
    """Arrays and statistics of samples [unit*S, (unit+1)*S) of a split."""
    cfg = ctx.cfg
    lay = cfg.dataset.layout
    size = cfg.dataset.grid.tile_size
    plan = ctx.plans[split]
    s = lay.shard_samples
    rows = plan[unit * s: (unit + 1) * s]
    n = rows.shape[0]
    fields = np.zeros((n, 1 + N_LEVELS, size, size), np.uint16)
    obs = np.zeros((n, lay.max_obs_pixels, 2 + N_LEVELS), np.uint16)
    meta = np.zeros((n, len(META_COLUMNS)), np.int32)
    obs_platform = np.full((n, lay.max_obs_pixels, PLATFORM_SLOTS), PLATFORM_NONE, np.int32)
    stats = {"count": np.zeros(N_LEVELS), "sum": np.zeros(N_LEVELS), "sumsq": np.zeros(N_LEVELS),
             "clipped": 0, "dropped_obs_pixels": 0, "obs_pixels": 0, "profiles": 0}
    for k, (day, tid) in enumerate(rows):
        raw = grid_sample(ctx, int(day), ctx.tiles[int(tid)])
        fields[k], obs[k], meta[k] = raw.fields, raw.obs, raw.meta
        obs_platform[k] = raw.obs_platform
        for key in stats:
            stats[key] += raw.stats[key]
    return {"split": split, "unit": unit, "fields": fields, "obs": obs, "meta": meta,
            "obs_platform": obs_platform,
            "stats": {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}}


_CTX: Context | None = None


def _worker(job: tuple[str, int]) -> dict[str, Any]:
    return compute_unit(_CTX, *job)


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------


def _marker(store: Path, split: str, unit: int) -> Path:
    return store / "build" / "units" / f"{split}-{unit:07d}.json"


def build_store(cfg: Config, glorys: str | list[str], ostia: str | list[str],
                en4: str | list[str], out: str | Path, *, workers: int = 1,
                progress: bool = True, overwrite: bool = False, max_units: int | None = None
                ) -> Path:
    """Build (or resume building) the store at `out`; returns its path.

    `workers` processes compute units (the parent writes); `max_units` stops after that many
    units without writing the manifest (resume later, e.g. across job time limits).
    """
    global _CTX
    import zarr

    out = Path(out)
    ctx = make_context(cfg, glorys, ostia, en4)
    digest = plan_hash(ctx)
    plan_file = out / "build" / "plan.json"
    if out.exists():
        old = None
        if plan_file.is_file():
            old = json.loads(plan_file.read_text()).get("hash")
        elif (out / MANIFEST).is_file() or any(out.iterdir()):
            old = "unknown"
        if old is not None and old != digest:
            if not overwrite:
                raise StoreError(f"store {out} was started from different sources/config "
                                 f"(plan {str(old)[:12]} != {digest[:12]}); pass --overwrite to rebuild")
            shutil.rmtree(out)
        elif (out / MANIFEST).is_file():
            read_manifest(out)
            return out
    lay = cfg.dataset.layout
    s = lay.shard_samples
    jobs = [(sp, u) for sp in SPLITS for u in range(math.ceil(ctx.plans[sp].shape[0] / s))]
    pending = [j for j in jobs if not _marker(out, *j).is_file()]
    if max_units is not None:
        pending = pending[:max_units]
    # Fork the workers before zarr starts its event-loop thread in this process.
    _CTX = ctx
    pool = None
    if workers > 1 and len(pending) > 1:
        pool = mp.get_context("fork").Pool(workers)
    try:
        (out / "build" / "units").mkdir(parents=True, exist_ok=True)
        root = zarr.open_group(str(out), mode="a", zarr_format=3)
        root.attrs.update({"format": FORMAT})
        for sp in SPLITS:
            create_split_arrays(root, sp, ctx.plans[sp].shape[0], cfg.dataset.grid.tile_size, lay)
        if not plan_file.is_file():
            np.save(out / "build" / "plan_train.npy", ctx.plans["train"])
            np.save(out / "build" / "plan_val.npy", ctx.plans["val"])
            write_json_atomic(plan_file, {"hash": digest})
        results = pool.imap_unordered(_worker, pending) if pool else map(_worker, pending)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(pending), desc="build units", unit="unit",
                           initial=len(jobs) - len(pending) if max_units is None else 0)
        for res in results:
            grp = root[res["split"]]
            a = res["unit"] * s
            n = res["meta"].shape[0]
            for name in ("fields", "obs", "meta", "obs_platform"):
                grp[name][a:a + n] = res[name]
            write_json_atomic(_marker(out, res["split"], res["unit"]), res["stats"])
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _CTX = None
    if any(not _marker(out, *j).is_file() for j in jobs):
        return out  # partial (max_units): no manifest, so readers refuse it
    write_json_atomic(out / MANIFEST, _manifest(ctx, out, jobs, digest))
    return out


def _manifest(ctx: Context, out: Path, jobs: list[tuple[str, int]], digest: str) -> dict:
    cfg = ctx.cfg
    lay = cfg.dataset.layout
    tot = {"count": np.zeros(N_LEVELS), "sum": np.zeros(N_LEVELS), "sumsq": np.zeros(N_LEVELS)}
    counters = {"clipped": 0, "dropped_obs_pixels": 0, "obs_pixels": 0, "profiles": 0}
    for sp, u in jobs:  # fixed order: identical sums for a resumed and an uninterrupted build
        st = json.loads(_marker(out, sp, u).read_text())
        for k in counters:
            counters[k] += st[k]
        if sp == "train":
            for k in tot:
                tot[k] += np.asarray(st[k])
    cnt = np.maximum(tot["count"], 1)
    mean_c = tot["sum"] / cnt
    std_c = np.sqrt(np.maximum(tot["sumsq"] / cnt - mean_c**2, 0))
    n_all = max(tot["count"].sum(), 1)
    m_all = tot["sum"].sum() / n_all
    s_all = math.sqrt(max(tot["sumsq"].sum() / n_all - m_all**2, 0))
    return {
        "format": FORMAT,
        "plan_hash": digest,
        "tile_size": cfg.dataset.grid.tile_size,
        "resolution_deg": cfg.dataset.grid.resolution_deg,
        "levels_m": GLORYS_DEPTHS.tolist(),
        "shard_samples": lay.shard_samples,
        "max_obs_pixels": lay.max_obs_pixels,
        "quantization": {"step_c": lay.quant_step_c, "min_c": lay.quant_min_c,
                         "max_abs_error_c": lay.quant_step_c / 2},
        "codec": {"compressor": lay.compressor, "clevel": lay.clevel, "shuffle": lay.shuffle,
                  "checksum": lay.checksum},
        "meta_columns": list(META_COLUMNS),
        "splits": {sp: {"n_samples": int(ctx.plans[sp].shape[0]),
                        "n_shards": math.ceil(ctx.plans[sp].shape[0] / lay.shard_samples)}
                   for sp in SPLITS},
        "sample_id_offset": {"train": 0, "val": int(ctx.plans["train"].shape[0])},
        "val_year": cfg.split.val_year,
        "temporal_window_days": cfg.dataset.sampling.temporal_window_days,
        "tiles": {str(t.tile_id): [t.row0, t.col0] for t in ctx.tiles.values()},
        # docs/data_store.md#profiles-potential-temperature-and-qc
        "profiles": {"temperature": cfg.dataset.sampling.argo_temperature,
                     "qc": cfg.dataset.sampling.argo_qc, "qc_reject_flag": "4",
                     **ctx.en4.summary},
        "platforms": ctx.en4.platforms,
        "platform_slots": PLATFORM_SLOTS,
        "sources": {"glorys": [os.path.basename(f) for f in ctx.glorys.files],
                    "ostia": [os.path.basename(f) for f in ctx.ostia.files],
                    "en4": [os.path.basename(f) for f in ctx.en4.files]},
        "stats": {"train_y_mean_K": m_all + 273.15, "train_y_std_K": s_all,
                  "train_y_level_mean_c": mean_c.tolist(), "train_y_level_std_c": std_c.tolist(),
                  "train_y_level_count": tot["count"].tolist(), **counters},
    }


@command(StoreError)
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m depthdif_hpc.data.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--glorys", help="glob of GLORYS thetao files (default: dataset.sources.glorys)")
    p.add_argument("--ostia", help="glob of OSTIA analysed_sst files")
    p.add_argument("--en4", help="glob of EN4 profile files")
    p.add_argument("--out", help="store path (default: dataset.store)")
    p.add_argument("--config", action="append", default=[], help="YAML config (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--max-units", type=int, default=None, help="stop after N units (resume later)")
    p.add_argument("--overwrite", action="store_true", help="rebuild a store planned differently")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    cfg = load_config(*a.config, overrides=a.set)
    src = cfg.dataset.sources
    g, o, e, out = a.glorys or src.glorys, a.ostia or src.ostia, a.en4 or src.en4, a.out or cfg.dataset.store
    missing = [n for n, v in (("--glorys", g), ("--ostia", o), ("--en4", e), ("--out", out)) if not v]
    if missing:
        p.error(f"missing {', '.join(missing)} (or set them in the config)")
    path = build_store(cfg, g, o, e, out, workers=a.workers, progress=not a.no_progress,
                       overwrite=a.overwrite, max_units=a.max_units)
    if (path / MANIFEST).is_file():
        man = read_manifest(path)
        print(f"store {path}: " + ", ".join(f"{k} {v['n_samples']} samples"
                                            for k, v in man["splits"].items()))
    else:
        print(f"store {path}: partial build (rerun to continue)")


if __name__ == "__main__":
    sys.exit(main())
