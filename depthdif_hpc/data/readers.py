"""Readers for the three source formats as the providers ship them (docs/model.md#data-sources).

* `GridSource`: a set of gridded NetCDF files, GLORYS-like `thetao(time, depth, lat, lon)` or
  OSTIA-like `analysed_sst(time, lat, lon)`, CF-packed or not; lat/latitude, lon/longitude,
  lon in 0..360 or -180..180, ascending or descending latitude. It interpolates a variable
  onto patch pixel centres for a day (linear in time between bracketing steps, bilinear in
  space) reading only the hyperslab it needs.
* `read_en4`: EN4-like profile files (N_PROF x N_LEVELS).

Anything unusable raises `SourceError` naming the file and the variable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from .grid import bilinear, bracket_axis, is_periodic_lon, wrap_lon
from .profiles import GLORYS_DEPTHS

LAT_NAMES = ("latitude", "lat", "LATITUDE", "nav_lat")
LON_NAMES = ("longitude", "lon", "LONGITUDE", "nav_lon")
DEPTH_NAMES = ("depth", "deptht", "lev", "DEPTH", "z")
TIME_NAMES = ("time", "TIME", "t")
EN4_FILL = 99999.0
REF_DAY = np.datetime64("1950-01-01T00:00:00", "s")


class SourceError(ValueError):
    """A source file or variable that cannot be used; the message names both."""


_UNIT_DAYS = {"day": 1.0, "days": 1.0, "hour": 1 / 24, "hours": 1 / 24, "minute": 1 / 1440,
              "minutes": 1 / 1440, "second": 1 / 86400, "seconds": 1 / 86400}


def to_days(values: np.ndarray, units: str | None, where: str) -> np.ndarray:
    """Times -> float days since 1950-01-01, from datetime64 (decoded) or CF `X since DATE`."""
    values = np.asarray(values)
    if np.issubdtype(values.dtype, np.datetime64):
        return (values.astype("datetime64[s]") - REF_DAY).astype(np.float64) / 86400.0
    m = re.match(r"\s*(\w+)\s+since\s+(\d{4}-\d{1,2}-\d{1,2})(?:[ T](\d{1,2}:\d{2}(?::\d{2})?))?",
                 units or "")
    if not m or m.group(1).lower() not in _UNIT_DAYS:
        raise SourceError(f"{where}: time units {units!r} are not 'days|hours|seconds since DATE'")
    y, mo, d = (int(v) for v in m.group(2).split("-"))
    hms = [int(v) for v in (m.group(3) or "0:0:0").split(":")] + [0]
    origin = np.datetime64(f"{y:04d}-{mo:02d}-{d:02d}T{hms[0]:02d}:{hms[1]:02d}:{hms[2]:02d}", "s")
    offset = (origin - REF_DAY).astype(np.float64) / 86400.0
    return offset + values.astype(np.float64) * _UNIT_DAYS[m.group(1).lower()]


def day_to_yyyymmdd(day: int) -> int:
    """Days since 1950-01-01 -> YYYYMMDD (true calendar)."""
    d = (np.datetime64("1950-01-01") + np.timedelta64(int(day), "D")).astype(str)
    return int(d.replace("-", ""))


def yyyymmdd_to_day(value: int | str) -> int:
    s = str(value).replace("-", "")
    d = np.datetime64(f"{s[:4]}-{s[4:6]}-{s[6:8]}")
    return int((d - np.datetime64("1950-01-01")).astype(int))


def contract_date(day: int) -> int:
    """YYYYMMDD for the batch contract: Feb 29 maps to Feb 28 (non-leap calendar,
    docs/model.md#batch-contract)."""
    v = day_to_yyyymmdd(day)
    return v - 1 if v % 10000 == 229 else v


def _find(names: tuple[str, ...], ds: xr.Dataset, where: str, what: str) -> str:
    for n in names:
        if n in ds.variables or n in ds.dims:
            return n
    raise SourceError(f"{where}: no {what} coordinate (looked for {list(names)}); "
                      f"has {sorted(map(str, ds.variables))}")


def _open(path: str) -> xr.Dataset:
    try:
        return xr.open_dataset(path, engine="netcdf4", decode_times=False, mask_and_scale=True)
    except Exception as exc:  # netCDF4 raises OSError/RuntimeError/ValueError variously
        raise SourceError(f"{path}: cannot open as NetCDF: {exc}") from exc


@dataclass
class _Grid:
    lats: np.ndarray  # ascending
    lat_flip: bool  # file latitude is descending
    lons: np.ndarray  # ascending in [-180, 180)
    lon_order: np.ndarray  # file index of each sorted lon
    periodic: bool
    depths: np.ndarray | None


@dataclass
class GridSource:
    """A variable on a regular lat/lon grid spread over many NetCDF files (one grid for all).

    `entries` holds (day, file index, time index) sorted by day; day = floor of the time in
    days since 1950-01-01, so 00:00 and 12:00 stamps of the same date are the same day.
    """

    files: list[str]
    var: str
    kind: str  # "glorys" (4-D, depth) | "ostia" (3-D)
    entries: list[tuple[int, int, int]] = field(default_factory=list)
    grid: _Grid | None = None
    _handles: dict = field(default_factory=dict, repr=False)
    _pid: int = -1

    @classmethod
    def scan(cls, files: list[str], var: str, kind: str) -> GridSource:
        if not files:
            raise SourceError(f"no {kind} files given")
        src = cls(sorted(files), var, kind)
        seen: dict[int, str] = {}
        for fi, path in enumerate(src.files):
            with _open(path) as ds:
                grid, tname = src._check(ds, path)
                if src.grid is None:
                    src.grid = grid
                elif (grid.lats.shape != src.grid.lats.shape or grid.lons.shape != src.grid.lons.shape
                      or not np.allclose(grid.lats, src.grid.lats) or not np.allclose(grid.lons, src.grid.lons)):
                    raise SourceError(f"{path}: variable '{var}' is on a different lat/lon grid than "
                                      f"{src.files[0]}")
                days = to_days(ds[tname].values, ds[tname].attrs.get("units"), f"{path}:{tname}")
                for ti, d in enumerate(np.atleast_1d(days)):
                    day = int(np.floor(d + 1e-6))
                    if day in seen:
                        raise SourceError(f"{path}: variable '{var}' repeats day {day_to_yyyymmdd(day)} "
                                          f"already in {seen[day]}")
                    seen[day] = path
                    src.entries.append((day, fi, ti))
        src.entries.sort()
        return src

    def _check(self, ds: xr.Dataset, path: str) -> tuple[_Grid, str]:
        if self.var not in ds.variables:
            raise SourceError(f"{path}: variable '{self.var}' not found; has "
                              f"{sorted(map(str, ds.data_vars))}")
        da = ds[self.var]
        lat, lon = _find(LAT_NAMES, ds, path, "latitude"), _find(LON_NAMES, ds, path, "longitude")
        tname = _find(TIME_NAMES, ds, path, "time")
        want = [tname, lat, lon]
        depths = None
        if self.kind == "glorys":
            dname = _find(DEPTH_NAMES, ds, path, "depth")
            want = [tname, dname, lat, lon]
            depths = np.asarray(ds[dname].values, np.float64)
            if depths.shape != GLORYS_DEPTHS.shape or not np.allclose(depths, GLORYS_DEPTHS, rtol=0.01):
                raise SourceError(f"{path}: variable '{self.var}' has {depths.size} depth levels "
                                  f"({depths[:3]}...), expected the 50 GLORYS levels 0.494..5727.917 m")
        if sorted(da.dims) != sorted(want):
            raise SourceError(f"{path}: variable '{self.var}' has dims {da.dims}, expected {tuple(want)}")
        lats = np.asarray(ds[lat].values, np.float64)
        lons = np.asarray(ds[lon].values, np.float64)
        if lats.ndim != 1 or lons.ndim != 1:
            raise SourceError(f"{path}: variable '{self.var}': 2-D lat/lon (curvilinear) grids "
                              "are not supported")
        flip = lats.size > 1 and lats[0] > lats[-1]
        lats_s = lats[::-1] if flip else lats
        if lats_s.size > 1 and np.any(np.diff(lats_s) <= 0):
            raise SourceError(f"{path}: variable '{self.var}': latitude is not monotonic")
        wl = wrap_lon(lons)
        order = np.argsort(wl, kind="stable")
        lons_s = wl[order]
        if lons_s.size > 1 and np.any(np.diff(lons_s) <= 0):
            raise SourceError(f"{path}: variable '{self.var}': longitude has duplicates after "
                              "wrapping to [-180, 180)")
        periodic = is_periodic_lon(lons_s)
        if not periodic and lons_s.size > 2:
            step = float(np.median(np.diff(lons_s)))
            gaps = np.flatnonzero(np.diff(lons_s) > 1.5 * step)
            wraps = lons_s[0] - step < -180.0 + 0.5 * step and lons_s[-1] + step > 180.0 - 0.5 * step
            if gaps.size == 1 and wraps:
                # A regional grid across the dateline: rotate it into one ascending axis
                # that runs past 180 (targets west of its start are shifted by +360).
                k = int(gaps[0]) + 1
                order = np.roll(order, -k)
                lons_s = np.concatenate([lons_s[k:], lons_s[:k] + 360.0])
            elif gaps.size:
                raise SourceError(f"{path}: variable '{self.var}': longitude has gaps (at "
                                  f"{lons_s[gaps[0]]:.3f} .. {lons_s[gaps[0] + 1]:.3f})")
        return _Grid(lats_s, bool(flip), lons_s, order, periodic, depths), tname

    # ---- coverage ---------------------------------------------------------------------------
    @property
    def days(self) -> np.ndarray:
        return np.array([e[0] for e in self.entries], dtype=np.int64)

    def covers(self, lats: np.ndarray, lons: np.ndarray) -> bool:
        """True when all target points lie inside the grid (no extrapolation)."""
        g = self.grid
        if lats.min() < g.lats[0] or lats.max() > g.lats[-1]:
            return False
        if g.periodic:
            return True
        lw = self._axis_lons(lons)
        return bool(lw.min() >= g.lons[0] and lw.max() <= g.lons[-1])

    def _axis_lons(self, lons: np.ndarray) -> np.ndarray:
        """Target longitudes in the grid's axis convention (past 180 for dateline grids)."""
        lw = wrap_lon(lons)
        if self.grid.periodic:
            return lw
        return np.where(lw < self.grid.lons[0], lw + 360.0, lw)

    def bracket(self, day: int) -> list[tuple[tuple[int, int, int], float]]:
        """Entries and weights for a day: the exact step, or the two bracketing steps."""
        days = self.days
        k = int(np.searchsorted(days, day))
        if k < days.size and days[k] == day:
            return [(self.entries[k], 1.0)]
        if k == 0 or k == days.size:
            raise SourceError(f"{self.kind} '{self.var}': day {day_to_yyyymmdd(day)} is outside "
                              f"the files' time range {day_to_yyyymmdd(days[0])}..{day_to_yyyymmdd(days[-1])}")
        d0, d1 = days[k - 1], days[k]
        w1 = (day - d0) / (d1 - d0)
        return [(self.entries[k - 1], 1.0 - w1), (self.entries[k], w1)]

    # ---- reading ----------------------------------------------------------------------------
    def _dataset(self, fi: int) -> xr.Dataset:
        # Handles opened before a fork are not safe in the child (HDF5): reopen per process.
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        ds = self._handles.get(fi)
        if ds is None:
            if len(self._handles) >= 4:
                old = next(iter(self._handles))
                self._handles.pop(old).close()
            ds = self._handles[fi] = _open(self.files[fi])
        return ds

    def close(self) -> None:
        for ds in self._handles.values():
            ds.close()
        self._handles = {}

    def interp(self, day: int, lats: np.ndarray, lons: np.ndarray, levels: slice | None = None
               ) -> np.ndarray:
        """Field at `day` on the outer product of target lats x lons: ([D,] H, W) float32, NaN invalid.

        Values that look like Kelvin (median > 100) are converted to degC.
        """
        out = None
        for (_d, fi, ti), w in self.bracket(day):
            f = self._interp_step(fi, ti, lats, lons, levels)
            out = f * np.float32(w) if out is None else out + f * np.float32(w)
        finite = out[np.isfinite(out)]
        if finite.size and np.median(finite) > 100.0:
            out = out - np.float32(273.15)
        return out

    def _interp_step(self, fi: int, ti: int, lats: np.ndarray, lons: np.ndarray,
                     levels: slice | None) -> np.ndarray:
        g = self.grid
        ny, nx = g.lats.size, g.lons.size
        i0, wy, oky = bracket_axis(g.lats, np.asarray(lats, np.float64))
        j0, wx, okx = bracket_axis(g.lons, self._axis_lons(lons), periodic=g.periodic)
        rows = np.unique(np.concatenate([i0, np.minimum(i0 + 1, ny - 1)]))
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        cols = np.unique(np.concatenate([j0, (j0 + 1) % nx]))
        block = self._read(fi, ti, r0, r1, g.lon_order[cols], levels)  # (..., r1-r0, len(cols))
        # Sorted-axis indices -> positions inside the block.
        lut = np.full(nx, -1, np.int64)
        lut[cols] = np.arange(cols.size)
        return bilinear(block, i0 - r0, np.minimum(i0 + 1, ny - 1) - r0, wy, oky,
                        lut[j0], lut[(j0 + 1) % nx], wx, okx)

    def _read(self, fi: int, ti: int, r0: int, r1: int, file_cols: np.ndarray,
              levels: slice | None) -> np.ndarray:
        """Rows r0:r1 (sorted lat order) and the given file columns, as float32 (NaN fill)."""
        g = self.grid
        ds = self._dataset(fi)
        da = ds[self.var]
        lat, lon = _find(LAT_NAMES, ds, self.files[fi], "lat"), _find(LON_NAMES, ds, self.files[fi], "lon")
        tname = _find(TIME_NAMES, ds, self.files[fi], "time")
        ny = g.lats.size
        fr = slice(ny - r1, ny - r0) if g.lat_flip else slice(r0, r1)
        order = np.argsort(file_cols, kind="stable")
        fc = file_cols[order]
        # Contiguous runs of file columns: one hyperslab read each (two at most across a wrap).
        breaks = np.flatnonzero(np.diff(fc) != 1) + 1
        parts = []
        sel: dict = {tname: ti, lat: fr}
        if self.kind == "glorys":
            sel[_find(DEPTH_NAMES, ds, self.files[fi], "depth")] = levels if levels is not None else slice(None)
        try:
            for run in np.split(fc, breaks):
                sub = da.isel({**sel, lon: slice(int(run[0]), int(run[-1]) + 1)})
                dims = [d for d in (sub.dims) if d not in (lat, lon)] + [lat, lon]
                parts.append(np.asarray(sub.transpose(*dims).values, dtype=np.float32))
        except Exception as exc:
            raise SourceError(f"{self.files[fi]}: cannot read variable '{self.var}': {exc}") from exc
        block = np.concatenate(parts, axis=-1)
        if g.lat_flip:
            block = block[..., ::-1, :]
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        return np.ascontiguousarray(block[..., inv])


@dataclass
class Profiles:
    """EN4-like profiles: juld (days since 1950-01-01), positions, (P, L) temp/depth with NaN.

    `temp` is potential temperature (reference 0 dbar) unless read with temperature="in_situ";
    `platform` holds each profile's platform id ("" where the file has none). The counters say
    what the reader did (docs/data_store.md#profiles-potential-temperature-and-qc).
    """

    juld: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    temp: np.ndarray
    depth: np.ndarray
    platform: np.ndarray = field(default_factory=lambda: np.zeros(0, "U1"))
    temperature_source: str = ""  # the variable read, or "<TEMP>+<PSAL> (gsw pt0)"
    qc_rejected_profiles: int = 0
    qc_rejected_levels: int = 0
    salinity_assumed_levels: int = 0  # computed pt0 used ASSUMED_SALINITY at these levels


# EN4's quality-control convention (Met Office Hadley Centre, "EN4 profile file format"): a '4'
# in POSITION_QC, JULD_QC or PROFILE_<VAR>_QC rejects the whole profile, a '4' at a level of
# <VAR>_CORRECTED_QC rejects that level. Anything else ('0', '1', blank) is kept.
EN4_REJECT = b"4"
EN4_PROFILE_QC = ("POSITION_QC", "JULD_QC")
# Salinity where a computed potential temperature has none (absent, fill or rejected). At
# 2000 dbar one unit of salinity moves pt0 by about 0.003 degC (gsw, 2-10 degC), so an assumed
# 35 costs at most a few mK in the open ocean.
ASSUMED_SALINITY = 35.0


def _en4_values(ds: xr.Dataset, name: str, path: str) -> np.ndarray:
    if name not in ds.variables:
        raise SourceError(f"{path}: variable '{name}' not found; has {sorted(map(str, ds.data_vars))}")
    v = np.asarray(ds[name].values)
    if np.issubdtype(v.dtype, np.datetime64):
        return v
    v = v.astype(np.float64)
    v[(v == EN4_FILL) | (np.abs(v) > 1e6)] = np.nan
    return v


def _chars(ds: xr.Dataset, name: str, shape: tuple[int, ...], path: str) -> np.ndarray | None:
    """A character variable as an array of single bytes of `shape` (None if absent).

    xarray joins a char variable's last dimension into fixed-width strings, so EN4's
    POTM_CORRECTED_QC (N_PROF, N_LEVELS) arrives as N_PROF strings and PROFILE_POTM_QC as
    N_PROF one-byte strings; both are split back into one flag per profile or level.
    """
    if name not in ds.variables:
        return None
    v = np.asarray(ds[name].values)
    if v.dtype.kind == "U":
        v = np.char.encode(v, "ascii")
    if v.dtype.kind == "O":
        v = np.array([x if isinstance(x, bytes) else str(x).encode() for x in v.ravel()]).reshape(v.shape)
    if v.dtype.kind != "S":
        raise SourceError(f"{path}: variable '{name}' is {v.dtype}, expected characters")
    if v.ndim == len(shape) - 1 and len(shape) == 2:
        v = np.char.ljust(v, shape[1]) if v.dtype.itemsize < shape[1] else v
        v = np.ascontiguousarray(v.astype(f"S{shape[1]}")).view("S1").reshape(v.shape[0], shape[1])
    elif v.dtype.itemsize != 1:
        v = np.array([x[:1] for x in v.ravel()], "S1").reshape(v.shape)
    if v.shape != shape:
        raise SourceError(f"{path}: variable '{name}' has shape {v.shape}, expected {shape}")
    return v


def platform_ids(ds: xr.Dataset, n: int, path: str, var: str = "PLATFORM_NUMBER") -> np.ndarray:
    """(n,) str platform ids (stripped), "" where the file has no `var`."""
    if var not in ds.variables:
        return np.full(n, "", dtype="U1")
    v = np.asarray(ds[var].values)
    if v.dtype.kind == "S" and v.ndim == 2:  # undecoded char array
        v = np.array([b"".join(row) for row in v])
    if v.shape != (n,):
        raise SourceError(f"{path}: variable '{var}' has shape {v.shape}, expected (N_PROF={n},)")
    out = [x.decode("ascii", "replace") if isinstance(x, bytes) else str(x) for x in v]
    return np.array([x.replace("\x00", "").strip() for x in out], dtype=str)


def potential_temperature(temp: np.ndarray, psal: np.ndarray, depth: np.ndarray,
                          lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(P, L) in-situ temperature (ITS-90, degC), practical salinity and depth (m) at profile
    positions (P,) -> potential temperature referenced to 0 dbar (TEOS-10, gsw).

    Pressure from depth and latitude (gsw.p_from_z), absolute salinity from practical salinity
    (gsw.SA_from_SP), then gsw.pt0_from_t. NaN where temperature or depth is NaN; salinity
    must already be filled.
    """
    import gsw

    la = np.broadcast_to(np.asarray(lat, np.float64)[:, None], temp.shape)
    lo = np.broadcast_to(np.asarray(lon, np.float64)[:, None], temp.shape)
    p = gsw.p_from_z(-np.asarray(depth, np.float64), la)
    sa = gsw.SA_from_SP(np.asarray(psal, np.float64), p, lo, la)
    return np.asarray(gsw.pt0_from_t(sa, np.asarray(temp, np.float64), p), np.float64)


def read_en4(path: str, temp_var: str = "TEMP", depth_var: str = "DEPH_CORRECTED",
             positions_only: bool = False, *, temperature: str = "potential",
             potm_var: str = "POTM_CORRECTED", psal_var: str = "PSAL_CORRECTED",
             qc: str = "en4") -> Profiles:
    """Read one EN4-like profile file. Fill 99999 or |v| > 1e6 -> NaN.

    temperature="potential": `potm_var` (EN4's corrected potential temperature) when the file
    has it, else computed from `temp_var` (in situ), `psal_var` and depth with gsw
    (`potential_temperature`); "in_situ": `temp_var` as is. qc="en4": profiles and levels
    that EN4's flags reject (`EN4_REJECT`) are dropped (levels -> NaN); "none": flags ignored.
    Profiles without a finite time or position are dropped (they cannot be placed).
    `positions_only` skips the level data but still applies the profile flags.
    """
    with _open(path) as ds:
        juld_raw = _en4_values(ds, "JULD", path)
        juld = to_days(juld_raw, ds["JULD"].attrs.get("units", "days since 1950-01-01"),
                       f"{path}:JULD")
        lat = _en4_values(ds, "LATITUDE", path)
        lon = _en4_values(ds, "LONGITUDE", path)
        if not (juld.ndim == lat.ndim == lon.ndim == 1 and juld.shape == lat.shape == lon.shape):
            raise SourceError(f"{path}: JULD/LATITUDE/LONGITUDE must be 1-D of length N_PROF, got "
                              f"{juld.shape}/{lat.shape}/{lon.shape}")
        n = juld.shape[0]
        platform = platform_ids(ds, n, path)
        use_potm = temperature == "potential" and potm_var in ds.variables
        tvar = potm_var if use_potm else temp_var
        # Temperature QC: EN4 flags temperature through its potential temperature variable.
        qc_var = f"{potm_var}_QC"
        qc_prof = f"PROFILE_{potm_var.split('_')[0]}_QC"
        rejected = np.zeros(n, bool)
        if qc == "en4":
            for name in (*EN4_PROFILE_QC, qc_prof):
                f = _chars(ds, name, (n,), path)
                if f is not None:
                    rejected |= f == EN4_REJECT
        source = tvar
        bad_levels = assumed = 0
        if positions_only:
            temp = depth = np.zeros((n, 0), np.float32)
            if qc == "en4" and qc_var in ds.variables:  # count the rejected levels all the same
                f = _chars(ds, qc_var, (n, ds[qc_var].shape[-1] if ds[qc_var].ndim == 2
                                        else ds[qc_var].dtype.itemsize), path)
                bad_levels = int((f[~rejected] == EN4_REJECT).sum())
        else:
            temp = _en4_values(ds, tvar, path)
            depth = _en4_values(ds, depth_var, path)
            for name, v in ((tvar, temp), (depth_var, depth)):
                if v.ndim != 2 or v.shape[0] != n:
                    raise SourceError(f"{path}: variable '{name}' has shape {v.shape}, expected "
                                      f"(N_PROF={n}, N_LEVELS)")
            if temp.shape != depth.shape:
                raise SourceError(f"{path}: variables '{tvar}' {temp.shape} and '{depth_var}' "
                                  f"{depth.shape} differ in shape")
            if qc == "en4":
                f = _chars(ds, qc_var, temp.shape, path)
                if f is not None:
                    bad = f == EN4_REJECT
                    bad_levels = int(bad[~rejected].sum())
                    temp[bad] = np.nan
            if temperature == "potential" and not use_potm:
                psal = (_en4_values(ds, psal_var, path) if psal_var in ds.variables
                        else np.full(temp.shape, np.nan))
                if psal.shape != temp.shape:
                    raise SourceError(f"{path}: variable '{psal_var}' has shape {psal.shape}, "
                                      f"expected {temp.shape} like '{tvar}'")
                if qc == "en4":
                    f = _chars(ds, f"{psal_var}_QC", temp.shape, path)
                    if f is not None:
                        psal[f == EN4_REJECT] = np.nan
                    f = _chars(ds, f"PROFILE_{psal_var.split('_')[0]}_QC", (n,), path)
                    if f is not None:
                        psal[f == EN4_REJECT] = np.nan
                miss = ~np.isfinite(psal) & np.isfinite(temp) & np.isfinite(depth)
                assumed = int(miss[~rejected].sum())
                psal[miss] = ASSUMED_SALINITY
                ok_lat = np.where(np.isfinite(lat), lat, 0.0)
                ok_lon = np.where(np.isfinite(lon), lon, 0.0)
                temp = potential_temperature(temp, np.where(np.isfinite(psal), psal, ASSUMED_SALINITY),
                                             depth, ok_lat, ok_lon)
                source = f"{temp_var}+{psal_var} (gsw pt0)"
    ok = (np.isfinite(juld) & np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90)
          & ~rejected)
    return Profiles(juld[ok], lat[ok], wrap_lon(lon[ok]), temp[ok].astype(np.float32),
                    depth[ok].astype(np.float32), platform[ok], source,
                    int(rejected.sum()), bad_levels, assumed)
