"""`python -m depthdif_hpc.inference.reconstruct`: one date of a region (or the globe) from the
source files, tiled, blended, with its ensemble spread, in one CF NetCDF file.

    python -m depthdif_hpc.inference.reconstruct --checkpoint CKPT --date 2018-01-03 \\
        --region=-40,-20,30,50 --ostia 'ostia/*.nc' --en4 'en4/*.nc' --out recon.nc \\
        [--glorys 'glorys/*.nc'] [--mask GLOB] [--ensemble 8] [--tile 128 --stride 96]

`--global` instead of `--region` covers the globe, periodic in longitude. The inputs of each
tile are gridded by the store builder's own `grid_sample` (the same readers, interpolation and
profile alignment as the training data), so no training store is needed. Land and pixels
below the sea floor come from the GLORYS files when given (which are otherwise only used to
score the result), else from `--mask` (GLORYS-format files of any date), else from the OSTIA
land mask at every depth (no sea floor then).

Under torchrun/srun ranks take disjoint tiles; each finished tile is a file written atomically
in OUT.work/, so a rerun of the same command continues where a killed run stopped. Rank 0
waits for every tile, blends them band by band into OUT (written as a temporary, renamed at
the end) and draws the figure. docs/reconstruct.md describes the layout and the blending.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import numpy as np
import torch
from tqdm import tqdm

from depthdif_hpc.command import command
from depthdif_hpc.config import Config, SamplerName
from depthdif_hpc.data.grid import Tile
from depthdif_hpc.data.profiles import GLORYS_DEPTHS
from depthdif_hpc.data.readers import GridSource, SourceError, day_to_yyyymmdd, yyyymmdd_to_day
from depthdif_hpc.inference.tiling import (
    Domain,
    Placement,
    TileResults,
    blend_rows,
    global_domain,
    plan_tiles,
    region_domain,
)
from depthdif_hpc.inference.writer import IMPLIED_SETTINGS
from depthdif_hpc.model.depthdif import SamplingPrecision
from depthdif_hpc.normalization import GLOBAL, Normalizer

FILL = np.float32(1.0e20)
TEMP_NAME = "thetao"
PLAN_FILE = "plan.json"
# Each member of a tile has its own noise generator, seeded by the tile's place on the global grid
# and the member's number: the same tile of any region, rank or rerun draws the same members, and
# member k is the same whatever the ensemble size.
_SEED_MIX = 1_000_003


def member_seed(seed: int, tile: Tile, member: int) -> int:
    return (seed * _SEED_MIX + tile.row0 * 100_000 + tile.col0) * 1_009 + member


# ------------------------------------------------------------------------------------------
# Inputs of one tile
# ------------------------------------------------------------------------------------------


@dataclass
class TileInput:
    batch: dict[str, torch.Tensor]  # the batch contract, B = 1; y zero (the model never sees it)
    truth: np.ndarray | None  # (D, H, W) degC from GLORYS, NaN invalid
    profiles: np.ndarray  # indices (into the EN4 index) of the profiles inside the tile


class SourceInputs:
    """Grids one tile of one date from the source files through `data.build.grid_sample`."""

    def __init__(self, cfg: Config, day: int, ostia: str | list[str], en4: str | list[str],
                 glorys: str | list[str] | None = None, mask: str | list[str] | None = None,
                 normalizer: Normalizer = GLOBAL) -> None:
        from depthdif_hpc.data.build import open_sources

        self.ctx = open_sources(cfg, glorys, ostia, en4)
        self.normalizer = normalizer  # the model's (dataset.normalization): inputs as it trained
        self.day = day
        self.mask = None
        if mask:
            from depthdif_hpc.data.build import expand

            self.mask = GridSource.scan(expand(mask, "mask"), cfg.dataset.sampling.glorys_var_name, "glorys")
        if self.ctx.glorys is None and self.mask is None:
            warnings.warn("neither --glorys nor --mask given: land from OSTIA, no sea floor "
                          "(every depth of an ocean pixel is reconstructed)", stacklevel=2)
        for src in (self.ctx.ostia, self.ctx.glorys):
            if src is not None:
                src.bracket(day)  # raises naming the files' range when the date is outside it

    @property
    def validity(self) -> str:
        if self.ctx.glorys is not None:
            return "GLORYS thetao finite on the date"
        if self.mask is not None:
            return "finite values of the --mask files"
        return "OSTIA analysed_sst finite (surface land mask at every depth)"

    def __call__(self, tile: Tile) -> TileInput | None:
        from depthdif_hpc.data.build import grid_sample
        from depthdif_hpc.data.decode import Decoder

        raw = grid_sample(self.ctx, self.day, tile)
        decoder = Decoder.from_quantizer(self.ctx.quant, tile.size, normalizer=self.normalizer)
        item = decoder.decode(0, raw.fields, raw.obs, raw.meta)
        lats, lons = tile.pixel_lats(), tile.pixel_lons()
        truth = None
        if self.ctx.glorys is not None:
            truth = self.ctx.quant.decode_c(raw.fields[1:])
            valid = item["y_valid_mask"]
        elif self.mask is not None:
            m = self.mask.interp(self.mask.entries[0][0], lats, lons)
            valid = torch.from_numpy(np.isfinite(m))
        else:
            valid = torch.from_numpy(np.repeat((raw.fields[0:1] != 0), GLORYS_DEPTHS.size, axis=0))
        if not bool(valid.any()):
            return None
        item["y"] = torch.zeros_like(item["y"])
        item["y_valid_mask"] = valid.clone()
        item["land_mask"] = valid[0:1].float()
        batch = {k: v.unsqueeze(0) for k, v in item.items()}
        return TileInput(batch, truth, raw.profiles)


# ------------------------------------------------------------------------------------------
# The model on one tile
# ------------------------------------------------------------------------------------------


class EnsembleRunner:
    """K members of one tile in one batch, member k from a generator seeded by `member_seed`."""

    def __init__(self, model: Any, *, ensemble: int = 1, sampler: str | None = None,
                 sampler_overrides: dict | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", precision: SamplingPrecision = "fp32") -> None:
        if ensemble < 1:
            raise ValueError(f"ensemble must be >= 1, got {ensemble}")
        self.precision = precision
        self.model = model.to(device).eval() if isinstance(model, torch.nn.Module) else model
        self.sampler = model.make_sampler(sampler, **(sampler_overrides or {}))
        self.ensemble, self.seed, self.device = ensemble, seed, torch.device(device)

    def __call__(self, tile: Tile, batch: dict[str, torch.Tensor]) -> np.ndarray:
        """(K, D, H, W) float32 degC, NaN off y_valid_mask."""
        rep = {k: v.repeat_interleave(self.ensemble, dim=0).to(self.device) for k, v in batch.items()}
        gens = [torch.Generator(device=self.device).manual_seed(member_seed(self.seed, tile, k))
                for k in range(self.ensemble)]
        res = self.model.predict(rep, sampler=self.sampler, generator=gens, precision=self.precision)
        return res.y_hat_denorm.float().cpu().numpy()


def tile_arrays(members: np.ndarray, truth: np.ndarray | None, profiles: np.ndarray,
                keep_members: bool) -> dict[str, np.ndarray]:
    """What a tile file holds: ensemble mean and variance (and members, truth, profile ids)."""
    k = members.shape[0]
    mean = members.mean(axis=0)
    var = members.var(axis=0, ddof=1) if k > 1 else np.zeros_like(mean)
    out = {"mean": mean.astype(np.float32), "var": var.astype(np.float32),
           "profiles": np.asarray(profiles, np.int64)}
    if keep_members:
        out["members"] = members.astype(np.float32)
    if truth is not None:
        out["truth"] = truth.astype(np.float32)
    return out


# ------------------------------------------------------------------------------------------
# Running the tiles
# ------------------------------------------------------------------------------------------


def run_tiles(plan: list[Placement], dom: Domain, size: int,
              compute: Callable[[Tile], dict[str, np.ndarray] | None], results: TileResults, *,
              rank: int = 0, world_size: int = 1, progress: bool = True) -> dict[str, float]:
    """Compute this rank's tiles (plan[rank::world_size]) that have no result yet.

    `compute(tile)` returns the tile's arrays, or None for a tile without ocean. The split
    depends only on the plan, so ranks agree on it whatever finished before they started.
    """
    mine = plan[rank::world_size]
    todo = [p for p in mine if results.status(p.index) is None]
    done = empty = 0
    t0 = time.perf_counter()
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), desc=f"tiles[{rank}]", unit="tile",
               disable=not progress, dynamic_ncols=True)
    for p in todo:
        arrays = compute(p.tile(dom, size))
        if arrays is None:
            results.write_empty(p.index)
            empty += 1
        else:
            results.write(p.index, arrays)
            done += 1
        bar.update(1)
    bar.close()
    dt = time.perf_counter() - t0
    return {"computed": done, "empty": empty, "skipped": len(mine) - len(todo), "seconds": dt,
            "tiles_per_s": done / dt if dt > 0 and done else 0.0}


def wait_for_tiles(plan: list[Placement], results: TileResults, *, stall_timeout_s: float,
                   poll_s: float = 2.0) -> None:
    """Block until every tile has a result; raise if none appears for stall_timeout_s."""
    last_n, last_t = -1, time.monotonic()
    while True:
        missing = [p.index for p in plan if results.status(p.index) is None]
        if not missing:
            return
        if len(missing) != last_n:
            last_n, last_t = len(missing), time.monotonic()
        elif time.monotonic() - last_t > stall_timeout_s:
            raise RuntimeError(f"{len(missing)} tiles (first {missing[:5]}) got no result for "
                               f"{stall_timeout_s:.0f} s: a rank died? Rerun the same command to "
                               "compute them")
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------
# The output file
# ------------------------------------------------------------------------------------------


def _chunks(dom: Domain, band_rows: int) -> tuple[int, int, int, int]:
    # One band of rows per chunk row: each chunk is compressed once, never re-read.
    return (1, 1, min(dom.nrows, band_rows), min(dom.ncols, 256))


def write_netcdf(out: str | Path, dom: Domain, plan: list[Placement], size: int,
                 results: TileResults, *, day: int, depth_m: np.ndarray, ensemble: int,
                 keep_members: bool, has_truth: bool, profiles: dict[str, np.ndarray] | None,
                 attrs: dict[str, Any], band_rows: int = 128) -> dict[str, Any]:
    """Blend every tile into the CF NetCDF `out` band by band; returns per-depth scores against
    the truth (when the tiles carry it). Written to OUT.part, fsynced, then renamed."""
    import netCDF4

    out = Path(out)
    tmp = out.with_name(out.name + ".part")
    tmp.unlink(missing_ok=True)
    nd = len(depth_m)
    fields: dict[str, tuple[int, ...]] = {"mean": (nd,), "var": (nd,)}
    if keep_members:
        fields["members"] = (ensemble, nd)
    if has_truth:
        fields["truth"] = (nd,)
    sq = np.zeros(nd)
    ab = np.zeros(nd)
    bias = np.zeros(nd)
    cnt = np.zeros(nd)
    ds = netCDF4.Dataset(tmp, "w", format="NETCDF4")
    try:
        ds.setncatts({"Conventions": "CF-1.8", **{k: v for k, v in attrs.items() if v is not None}})
        ds.createDimension("time", 1)
        ds.createDimension("depth", nd)
        ds.createDimension("lat", dom.nrows)
        ds.createDimension("lon", dom.ncols)
        t = ds.createVariable("time", "f8", ("time",))
        t.setncatts({"units": "days since 1950-01-01 00:00:00", "calendar": "standard",
                     "standard_name": "time", "long_name": "time", "axis": "T"})
        t[:] = [float(day)]
        z = ds.createVariable("depth", "f4", ("depth",))
        z.setncatts({"units": "m", "positive": "down", "standard_name": "depth",
                     "long_name": "depth below the sea surface", "axis": "Z"})
        z[:] = np.asarray(depth_m, np.float32)
        la = ds.createVariable("lat", "f8", ("lat",))
        la.setncatts({"units": "degrees_north", "standard_name": "latitude",
                      "long_name": "latitude", "axis": "Y"})
        la[:] = dom.lats()[::-1]
        lo = ds.createVariable("lon", "f8", ("lon",))
        lo.setncatts({"units": "degrees_east", "standard_name": "longitude",
                      "long_name": "longitude", "axis": "X"})
        lo[:] = dom.lons()
        dims = ("time", "depth", "lat", "lon")
        var = {}
        common = {"zlib": True, "complevel": 1, "fill_value": FILL, "chunksizes": _chunks(dom, band_rows)}
        var["mean"] = ds.createVariable(f"{TEMP_NAME}_mean", "f4", dims, **common)
        var["mean"].setncatts({"standard_name": "sea_water_potential_temperature", "units": "degC",
                               "long_name": "sea water potential temperature, ensemble mean of "
                               "the DepthDif reconstruction"})
        var["var"] = ds.createVariable(f"{TEMP_NAME}_std", "f4", dims, **common)
        var["var"].setncatts({"units": "degC", "long_name": "ensemble standard deviation of the "
                              "reconstructed sea water potential temperature"})
        if keep_members:
            ds.createDimension("realization", ensemble)
            r = ds.createVariable("realization", "i4", ("realization",))
            r.setncatts({"standard_name": "realization", "long_name": "ensemble member"})
            r[:] = np.arange(ensemble)
            var["members"] = ds.createVariable(
                f"{TEMP_NAME}_member", "f4", ("time", "realization", "depth", "lat", "lon"),
                zlib=True, complevel=1, fill_value=FILL, chunksizes=(1, 1, *_chunks(dom, band_rows)[1:]))
            var["members"].setncatts({"standard_name": "sea_water_potential_temperature",
                                      "units": "degC", "long_name": "ensemble member"})
        if has_truth:
            var["truth"] = ds.createVariable(f"{TEMP_NAME}_reference", "f4", dims, **common)
            var["truth"].setncatts({"standard_name": "sea_water_potential_temperature",
                                    "units": "degC", "long_name": "GLORYS reanalysis on the same "
                                    "grid (reference for scoring, not an input)"})
        # Bands in the file's row order (latitude ascending; domain rows run north to south).
        for f0 in range(0, dom.nrows, band_rows):
            f1 = min(f0 + band_rows, dom.nrows)
            r0, r1 = dom.nrows - f1, dom.nrows - f0
            band = blend_rows(results, plan, dom, size, r0, r1, fields)
            band["var"] = np.sqrt(np.maximum(band["var"], 0.0))
            lat_sl = slice(f0, f1)
            for k, v in var.items():
                data = band[k][..., ::-1, :]
                data = np.where(np.isfinite(data), data, FILL)
                if k == "members":
                    v[0, :, :, lat_sl, :] = data
                else:
                    v[0, :, lat_sl, :] = data
            if has_truth:
                d = band["mean"] - band["truth"]
                ok = np.isfinite(d)
                d0 = np.where(ok, d, 0.0).astype(np.float64)
                sq += (d0 * d0).sum(axis=(1, 2))
                ab += np.abs(d0).sum(axis=(1, 2))
                bias += d0.sum(axis=(1, 2))
                cnt += ok.sum(axis=(1, 2))
        if profiles is not None:
            n = profiles["lat"].size
            ds.createDimension("profile", n)
            for name, vals, att in (
                ("profile_lat", profiles["lat"], {"units": "degrees_north", "standard_name": "latitude"}),
                ("profile_lon", profiles["lon"], {"units": "degrees_east", "standard_name": "longitude"}),
                ("profile_time", profiles["day"], {"units": "days since 1950-01-01 00:00:00",
                                                   "calendar": "standard", "standard_name": "time"}),
            ):
                pv = ds.createVariable(name, "f8", ("profile",))
                pv.setncatts({**att, "long_name": f"{name.split('_')[1]} of an in-situ profile "
                              "inside a reconstructed tile and the time window (condition input)"})
                pv[:] = vals
        scores = {}
        if has_truth:
            c = np.maximum(cnt, 1)
            scores = {"rmse_c": np.sqrt(sq / c).tolist(), "mae_c": (ab / c).tolist(),
                      "bias_c": (bias / c).tolist(), "count": cnt.astype(int).tolist(),
                      "rmse_overall_c": float(np.sqrt(sq.sum() / max(cnt.sum(), 1)))}
            ds.setncattr("rmse_vs_reference_c", scores["rmse_overall_c"])
    except BaseException:
        ds.close()
        tmp.unlink(missing_ok=True)
        raise
    ds.close()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return scores


# ------------------------------------------------------------------------------------------
# Figure
# ------------------------------------------------------------------------------------------


def plot_reconstruction(nc: str | Path, png: str | Path, max_px: int = 900) -> Path:
    """Maps of the mean at the surface and three depths (beside the reference when the file has
    one), the ensemble std at the surface, and a depth-longitude section at the middle
    latitude."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import xarray as xr

    with xr.open_dataset(nc) as ds:
        depth = ds["depth"].values
        levels = [0] + [int(np.argmin(np.abs(depth - d))) for d in (100.0, 500.0, 1000.0)]
        step_y = max(1, math.ceil(ds.sizes["lat"] / max_px))
        step_x = max(1, math.ceil(ds.sizes["lon"] / max_px))
        sub = ds.isel(time=0, lat=slice(None, None, step_y), lon=slice(None, None, step_x))
        mean = sub[f"{TEMP_NAME}_mean"].isel(depth=levels).load()
        std0 = sub[f"{TEMP_NAME}_std"].isel(depth=0).load()
        ref = sub[f"{TEMP_NAME}_reference"].isel(depth=levels).load() \
            if f"{TEMP_NAME}_reference" in sub else None
        mid = ds.sizes["lat"] // 2
        sec = ds[f"{TEMP_NAME}_mean"].isel(time=0, lat=mid, lon=slice(None, None, step_x)).load()
        lat_mid = float(ds["lat"].values[mid])
    rows = 3 if ref is not None else 2
    fig, axes = plt.subplots(rows, 4, figsize=(18, 4.2 * rows), squeeze=False)
    ext = [float(mean.lon.min()), float(mean.lon.max()), float(mean.lat.min()), float(mean.lat.max())]
    for j, k in enumerate(levels):
        m = mean.isel(depth=j).values
        lo, hi = np.nanpercentile(m, [1, 99]) if np.isfinite(m).any() else (0, 1)
        im = axes[0, j].imshow(m, origin="lower", extent=ext, vmin=lo, vmax=hi, cmap="RdYlBu_r",
                               aspect="auto")
        axes[0, j].set_title(f"mean, {depth[k]:.0f} m")
        fig.colorbar(im, ax=axes[0, j], label="degC")
        if ref is not None:
            im = axes[1, j].imshow(ref.isel(depth=j).values, origin="lower", extent=ext, vmin=lo,
                                   vmax=hi, cmap="RdYlBu_r", aspect="auto")
            axes[1, j].set_title(f"reference (GLORYS), {depth[k]:.0f} m")
            fig.colorbar(im, ax=axes[1, j], label="degC")
    last = axes[rows - 1]
    im = last[0].imshow(std0.values, origin="lower", extent=ext, cmap="viridis", aspect="auto")
    last[0].set_title("ensemble std, surface")
    fig.colorbar(im, ax=last[0], label="degC")
    im = last[1].pcolormesh(sec.lon.values, sec.depth.values, sec.values, cmap="RdYlBu_r",
                            shading="auto")
    last[1].invert_yaxis()
    last[1].set_yscale("symlog", linthresh=50)
    last[1].set_title(f"section at {lat_mid:.2f} N")
    last[1].set_ylabel("depth (m)")
    fig.colorbar(im, ax=last[1], label="degC")
    for ax in last[2:]:
        ax.axis("off")
    fig.tight_layout()
    png = Path(png)
    tmp = png.with_name(png.name + ".part.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, png)
    return png


# ------------------------------------------------------------------------------------------
# The whole command
# ------------------------------------------------------------------------------------------


def parse_region(text: str) -> tuple[float, float, float, float]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 4:
        raise ValueError(f"--region {text!r}: expected lon0,lon1,lat0,lat1")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError as exc:
        raise ValueError(f"--region {text!r}: {exc}") from exc
    return vals  # type: ignore[return-value]


def parse_date(text: str) -> int:
    """YYYY-MM-DD or YYYYMMDD -> day since 1950-01-01."""
    s = str(text).replace("-", "")
    if len(s) != 8 or not s.isdigit():
        raise ValueError(f"--date {text!r}: expected YYYY-MM-DD")
    try:
        return yyyymmdd_to_day(s)
    except ValueError as exc:
        raise ValueError(f"--date {text!r}: {exc}") from exc


def _check_plan(work: Path, params: dict[str, Any]) -> None:
    """The work folder belongs to one set of parameters: a rerun with others is refused."""
    from depthdif_hpc.data.store import write_json_atomic

    f = work / PLAN_FILE
    if f.is_file():
        old = json.loads(f.read_text())
        old = IMPLIED_SETTINGS | old
        diff = sorted(k for k in set(old) | set(params) if old.get(k, params.get(k)) != params.get(k))
        if diff:
            raise ValueError(f"{work} holds tiles of another run (differs in {', '.join(diff)}): "
                             "remove it or choose another --out")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(f, params)


def reconstruct(
    model: Any,
    cfg: Config,
    *,
    date: str,
    out: str | Path,
    ostia: str | list[str],
    en4: str | list[str],
    glorys: str | list[str] | None = None,
    mask: str | list[str] | None = None,
    region: tuple[float, float, float, float] | None = None,
    tile: int | None = None,
    stride: int | None = None,
    ensemble: int = 1,
    keep_members: bool = False,
    sampler: str | None = None,
    sampler_overrides: dict | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    precision: SamplingPrecision = "fp32",
    rank: int = 0,
    world_size: int = 1,
    figure: str | Path | None = None,
    keep_work: bool = False,
    stall_timeout_s: float = 1800.0,
    band_rows: int = 128,
    progress: bool = True,
    inputs: Callable[[Tile], TileInput | None] | None = None,
    source_label: str = "",
) -> dict[str, Any]:
    """Reconstruct `region` (None: the globe) on `date` into the NetCDF `out`.

    Returns the tile counts and timing of this rank, and on rank 0 the output path and the
    scores against GLORYS (when given). `inputs` replaces the file gridding (tests)."""
    out = Path(out)
    day = parse_date(date)
    res = cfg.dataset.grid.resolution_deg
    size = int(tile or cfg.dataset.grid.tile_size)
    stride = int(stride or max(1, (3 * size) // 4))
    dom = global_domain(res) if region is None else region_domain(region, res, size)
    plan = plan_tiles(dom, size, stride)
    if inputs is None:
        inputs = SourceInputs(cfg, day, ostia, en4, glorys=glorys, mask=mask,
                              normalizer=model.normalizer)
    runner = EnsembleRunner(model, ensemble=ensemble, sampler=sampler,
                            sampler_overrides=sampler_overrides, seed=seed, device=device,
                            precision=precision)
    work = out.with_name(out.name + ".work")
    params = {"date": day_to_yyyymmdd(day), "region": list(region) if region else "global",
              "tile": size, "stride": stride, "ensemble": ensemble, "members": keep_members,
              "seed": seed, "sampler": runner.sampler.name,
              "sampler_steps": getattr(runner.sampler, "num_steps", None),
              "source": source_label, "truth": bool(glorys), "mask": bool(mask),
              "precision": precision}
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or choose another --out")
    _check_plan(work, params)
    results = TileResults(work / "tiles")

    def compute(t: Tile) -> dict[str, np.ndarray] | None:
        inp = inputs(t)
        if inp is None:
            return None
        return tile_arrays(runner(t, inp.batch), inp.truth, inp.profiles, keep_members)

    counts = run_tiles(plan, dom, size, compute, results, rank=rank, world_size=world_size,
                       progress=progress)
    report: dict[str, Any] = {"rank": rank, "tiles": len(plan), **counts}
    if rank != 0:
        return report
    wait_for_tiles(plan, results, stall_timeout_s=stall_timeout_s)
    n_ocean = sum(results.status(p.index) == "done" for p in plan)
    if n_ocean == 0:
        raise SourceError(f"no tile of the region has ocean on {day_to_yyyymmdd(day)} "
                          "(validity from the GLORYS/mask/OSTIA files)")
    profiles = _profiles_used(plan, results, inputs)
    first = next(p.index for p in plan if results.status(p.index) == "done")
    has_truth = "truth" in results.keys(first)
    nd = results.read(first, ["mean"])["mean"].shape[0]
    attrs = {
        "title": "DepthDif reconstruction of sea water potential temperature",
        "institution": "depthdif_hpc", "source": f"DepthDif diffusion model {source_label}".strip(),
        "history": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} depthdif-reconstruct",
        "references": "docs/reconstruct.md",
        "date": str(day_to_yyyymmdd(day)), "tile_px": size, "stride_px": stride,
        "blend_window": "w(i) = sin^2(pi (i + 0.5) / tile) per axis, product, normalised by the "
                        "sum of weights",
        "ensemble_size": ensemble, "seed": seed, "sampler": runner.sampler.name,
        "precision": precision,
        "land_and_sea_floor": getattr(inputs, "validity", "given by the inputs"),
        "tiles_total": len(plan), "tiles_with_ocean": n_ocean,
        "geospatial_lon_periodic": int(dom.periodic),
    }
    scores = write_netcdf(out, dom, plan, size, results, day=day, depth_m=GLORYS_DEPTHS[:nd],
                          ensemble=ensemble, keep_members=keep_members, has_truth=has_truth,
                          profiles=profiles, attrs=attrs, band_rows=band_rows)
    report.update({"out": str(out), "scores": scores, "domain": [dom.nrows, dom.ncols]})
    if figure:
        report["figure"] = str(plot_reconstruction(out, figure))
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _profiles_used(plan: list[Placement], results: TileResults, inputs: Any) -> dict[str, np.ndarray] | None:
    """Positions and times of the profiles of every reconstructed tile (each once)."""
    ctx = getattr(inputs, "ctx", None)
    if ctx is None:
        return None
    idx = [results.read(p.index, ["profiles"])["profiles"] for p in plan
           if results.status(p.index) == "done"]
    ids = np.unique(np.concatenate(idx)) if idx else np.zeros(0, np.int64)
    return {"lat": ctx.en4.lat[ids], "lon": ctx.en4.lon[ids], "day": ctx.en4.day[ids].astype(np.float64)}


def _rank() -> tuple[int, int, int]:
    from depthdif_hpc.launch_env import resolve_dist_env

    env = resolve_dist_env(export=False)
    return env.rank, env.world_size, env.local_rank


@command()
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m depthdif_hpc.inference.reconstruct", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or export folder")
    ap.add_argument("--date", required=True, help="YYYY-MM-DD")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--region", help="lon0,lon1,lat0,lat1 in degrees (write --region=-40,... when "
                       "it starts with a minus); lon1 < lon0 crosses the dateline")
    where.add_argument("--global", dest="whole_globe", action="store_true", help="the whole globe")
    ap.add_argument("--ostia", required=True, help="glob of OSTIA analysed_sst files")
    ap.add_argument("--en4", required=True, help="glob of EN4 profile files")
    ap.add_argument("--glorys", help="glob of GLORYS thetao files: land/sea floor and scoring only")
    ap.add_argument("--mask", help="glob of GLORYS-format files whose validity is land/sea floor")
    ap.add_argument("--out", required=True, help="output NetCDF file")
    ap.add_argument("--figure", help="PNG figure (default: OUT with .png)")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--tile", type=int, help="tile size in px (default: the checkpoint's tile_size)")
    ap.add_argument("--stride", type=int, help="tile stride in px (default: 3/4 of the tile)")
    ap.add_argument("--ensemble", "-k", type=int, default=1, help="members per tile")
    ap.add_argument("--members", action="store_true", help="also write every member")
    ap.add_argument("--sampler", choices=get_args(SamplerName),
                    help="default: the checkpoint's model.sampling.sampler")
    ap.add_argument("--steps", type=int, help="DDIM steps (default: config)")
    ap.add_argument("--eta", type=float, help="DDIM eta (default: config)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ema", action="store_true", help="use the raw weights even if EMA exists")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=get_args(SamplingPrecision), default="fp32",
                    help="the denoiser's arithmetic (bf16: autocast; docs/reconstruct.md)")
    ap.add_argument("--keep-work", action="store_true", help="keep OUT.work (the tile results)")
    ap.add_argument("--stall-timeout", type=float, default=1800.0,
                    help="rank 0 gives up when no tile finishes for this many seconds")
    ap.add_argument("--band-rows", type=int, default=128, help="rows blended at a time (memory)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("overrides", nargs="*", help="config key=value overrides")
    a = ap.parse_args(argv)
    try:
        region = None if a.whole_globe else parse_region(a.region)
        parse_date(a.date)
    except ValueError as exc:
        ap.error(str(exc))
    from depthdif_hpc.checkpoint.loading import load_model

    rank, world, local = _rank()
    device = a.device
    if device == "cuda" and world > 1:
        # Under srun --gpus-per-task=1 every task sees one device; under torchrun all of them.
        device = f"cuda:{local % max(torch.cuda.device_count(), 1)}"
    cfg, model = load_model(a.checkpoint, use_ema=not a.no_ema, overrides=list(a.overrides))
    over = {k: v for k, v in (("ddim_num_timesteps", a.steps), ("ddim_eta", a.eta)) if v is not None}
    figure = None if a.no_figure else (a.figure or str(Path(a.out).with_suffix(".png")))
    rep = reconstruct(model, cfg, date=a.date, out=a.out, ostia=a.ostia, en4=a.en4,
                      glorys=a.glorys, mask=a.mask, region=region, tile=a.tile,
                      stride=a.stride, ensemble=a.ensemble, keep_members=a.members,
                      sampler=a.sampler, sampler_overrides=over, seed=a.seed, device=device,
                      precision=a.precision, rank=rank, world_size=world, figure=figure, keep_work=a.keep_work,
                      stall_timeout_s=a.stall_timeout, band_rows=a.band_rows,
                      progress=not a.no_progress,
                      source_label=str(Path(a.checkpoint).resolve()))
    print(f"rank {rank}: {rep['computed']} tiles computed ({rep['tiles_per_s']:.3f} tiles/s), "
          f"{rep['empty']} without ocean, {rep['skipped']} already done, of {rep['tiles']}", flush=True)
    if rank == 0:
        if rep.get("scores"):
            print(f"RMSE against GLORYS: {rep['scores']['rmse_overall_c']:.3f} degC")
        print(f"reconstruction: {rep['out']}" + (f"  figure: {rep['figure']}" if "figure" in rep else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
