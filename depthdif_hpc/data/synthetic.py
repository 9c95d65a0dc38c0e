"""A synthetic ocean written in the three source formats (GLORYS-, OSTIA- and EN4-like NetCDF).

    python -m depthdif_hpc.data.synthetic --out DIR [--region LON0 LON1 LAT0 LAT1]
        [--start YYYY-MM-DD] [--end YYYY-MM-DD] [--seed N] [--glorys-every DAYS]
        [--lon360] [--lat-descending]

writes DIR/glorys/*.nc, DIR/ostia/*.nc and DIR/en4/*.nc. The ocean is analytic, so every
product samples the same truth:

* SST depends on latitude and season; a mixed layer (deeper in winter and at high latitude)
  sits on an exponential thermocline over cold deep water;
* mesoscale eddies are a sum of random plane waves whose amplitudes follow an energy spectrum
  E(k) ~ k^-3 between 40 and 600 km wavelengths; they drift west (~4 km/day) and decorrelate
  over ~2 months, so fields change smoothly from day to day;
* mode "v2" (the default; docs/synthetic.md): three subsurface eddy modes with their own
  random fields and vertical structures (zero at the surface), thermocline heave, a
  mixed-layer depth field varying in space and season, and mean profiles that depend on
  latitude; mode "simple": the subsurface is the surface eddy field scaled by depth;
* land is the real coastline (`global-land-mask`); the sea floor deepens with distance from
  the coast, and levels below it are NaN;
* OSTIA is the analytic SST plus a small smooth error field and white noise (close to, not
  equal to, the GLORYS surface), with fill on land and under ice;
* Argo-like floats (platform ids) drift, surface about every 10 days and sample to about
  2000 m (shallower over shelves) at irregular depths with 0.002 degC noise; the EN4 files
  hold in-situ TEMP, POTM_CORRECTED, PSAL_CORRECTED, DEPH_CORRECTED, PLATFORM_NUMBER and QC
  flags, with flagged spikes and biased profiles for QC to remove.

`build_tiny_store()` generates a few tiles and days and builds a store: the fixture other
components use for tests and demos. Nothing here is needed when real files are given.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..command import command
from .profiles import GLORYS_DEPTHS
from .readers import day_to_yyyymmdd, yyyymmdd_to_day

EARTH_KM = 6371.0
GLORYS_RES = 1 / 12
OSTIA_RES = 0.05


def _optional(module: str, name: str) -> Any:
    """A name from the synthetic ocean's own dependencies (the `synthetic` extra), which the
    package itself does not need."""
    import importlib

    try:
        return getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise ImportError(f"the synthetic ocean needs {module.split('.')[0]} "
                          "(pip install 'depthdif-hpc[synthetic]')") from exc


@dataclass
class _Modes:
    kx: np.ndarray  # rad/km
    ky: np.ndarray
    amp: np.ndarray
    phase: np.ndarray
    omega: np.ndarray  # rad/day (intrinsic evolution)


def _modes(rng: np.random.Generator, n: int, lmin_km: float, lmax_km: float,
           drift_km_day: float, decorrelation_days: float) -> _Modes:
    # log-uniform |k| => dk ~ k, so amp^2 ~ E(k) dk ~ k^-2 gives E(k) ~ k^-3.
    k = np.exp(rng.uniform(np.log(2 * np.pi / lmax_km), np.log(2 * np.pi / lmin_km), n))
    theta = rng.uniform(0, 2 * np.pi, n)
    amp = 1.0 / k
    amp *= math.sqrt(2.0 / np.sum(amp**2))  # unit variance of the sum of cosines
    kx, ky = k * np.cos(theta), k * np.sin(theta)
    # Westward drift: phase kx * (x + c t); plus a random intrinsic frequency.
    omega = kx * drift_km_day + rng.normal(0, 1.0 / decorrelation_days, n)
    return _Modes(kx, ky, amp, rng.uniform(0, 2 * np.pi, n), omega)


Mode = Literal["v2", "simple"]


@dataclass(frozen=True)
class V2Params:
    """The v2 ocean's knobs (docs/synthetic.md gives the published facts each follows)."""

    # Subsurface eddy fields, each its own random field (wavelengths lmin..lmax km) under its
    # own vertical structure, zero at the surface so the SST does not show them:
    # (amplitude degC, depth of the maximum m, vertical width m, lmin, lmax, decorrelation days)
    modes: tuple[tuple[float, float, float, float, float, float], ...] = (
        (0.9, 250.0, 180.0, 60.0, 450.0, 50.0),    # upper thermocline
        (0.35, 700.0, 300.0, 50.0, 350.0, 70.0),   # lower thermocline / intermediate water
        (0.12, 1500.0, 450.0, 40.0, 300.0, 90.0),  # deep: the 1000-2000 m signal
    )
    heave_m: float = 45.0  # thermocline heave (vertical displacement) amplitude, 1 sigma
    mld_summer_m: float = 22.0
    mld_winter_m: float = 160.0  # at |lat| >= 45 in late winter, before the spatial factor
    mld_spatial: float = 0.35  # log-amplitude of the large-scale mixed-layer depth field
    surface_eddy_decay_m: float = 120.0  # the SST eddies' reach below the mixed layer


class SyntheticOcean:
    """Analytic temperature T(lat, lon, depth, day) on a region, plus land and sea floor.

    mode "v2" (default): subsurface eddy modes, thermocline heave and a mixed-layer depth
    field that the surface does not show, latitude-dependent mean profiles. mode "simple":
    the deep field is the surface eddy field scaled by depth (cheap, for tests).
    """

    def __init__(self, region: tuple[float, float, float, float], seed: int = 0,
                 mode: Mode = "v2", params: V2Params | None = None):
        if mode not in ("v2", "simple"):
            raise ValueError(f"mode {mode!r}: expected 'v2' or 'simple'")
        self.region = region
        self.mode = mode
        self.params = params or V2Params()
        self.lon0 = (region[0] + region[1]) / 2
        self.lat0 = (region[2] + region[3]) / 2
        rng = np.random.default_rng(seed)
        self.eddy = _modes(rng, 160, 40.0, 600.0, 4.0, 60.0)
        self.err = _modes(rng, 60, 60.0, 800.0, 2.0, 10.0)
        self.rough = _modes(rng, 60, 30.0, 400.0, 0.0, 1e9)
        self.rng = rng
        # The v2 fields draw from their own stream, so "simple" is the same ocean as before.
        r2 = np.random.default_rng([seed, 2])
        self.sub = [_modes(r2, 120, lmin, lmax, 3.0, dec)
                    for (_a, _z, _w, lmin, lmax, dec) in self.params.modes]
        self.heave = _modes(r2, 120, 60.0, 500.0, 3.0, 45.0)
        self.mld_field = _modes(r2, 60, 300.0, 1500.0, 1.0, 90.0)
        # Sea floor on the GLORYS grid, used for both gridded fields and floats.
        self.g_lat, self.g_lon = glorys_axes(region)
        self.floor = self._floor_grid()

    # ---- geometry ---------------------------------------------------------------------------
    def _xy(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = EARTH_KM * math.cos(math.radians(self.lat0)) * np.radians(lon - self.lon0)
        y = EARTH_KM * np.radians(lat - self.lat0)
        return x, y

    def _field_grid(self, m: _Modes, lat: np.ndarray, lon: np.ndarray, day: float) -> np.ndarray:
        """Sum of modes on the lat x lon outer grid: separable, so two small matrix products."""
        x, y = self._xy(lat, lon)
        ey = np.exp(1j * np.outer(y, m.ky))
        ex = np.exp(1j * np.outer(x, m.kx))
        c = m.amp * np.exp(1j * (m.phase + m.omega * day))
        return np.real((ey * c) @ ex.T)

    def _field_pts(self, m: _Modes, lat: np.ndarray, lon: np.ndarray, day: np.ndarray) -> np.ndarray:
        x, y = self._xy(lat, lon)
        arg = np.outer(x, m.kx) + np.outer(y, m.ky) + m.phase + np.outer(day, m.omega)
        return np.cos(arg) @ m.amp

    @staticmethod
    def land(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        globe = _optional("global_land_mask", "globe")

        lat = np.clip(lat, -89.999, 89.999)
        lon = (lon + 180.0) % 360.0 - 180.0
        return globe.is_land(lat, lon)

    def _floor_grid(self) -> np.ndarray:
        distance_transform_edt = _optional("scipy.ndimage", "distance_transform_edt")

        la, lo = np.meshgrid(self.g_lat, self.g_lon, indexing="ij")
        land = self.land(la, lo)
        dy = EARTH_KM * math.radians(GLORYS_RES)
        dx = dy * math.cos(math.radians(self.lat0))
        dist = distance_transform_edt(~land, sampling=(dy, dx)) if land.any() else np.full(land.shape, 1e4)
        rough = self._field_grid(self.rough, self.g_lat, self.g_lon, 0.0)
        floor = 15.0 + 5200.0 * (1 - np.exp(-dist / 140.0)) * (1 + 0.12 * rough)
        floor = np.clip(floor, 10.0, 5600.0)
        floor[land] = 0.0
        return floor

    def floor_at(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        i = np.clip(np.rint((lat - self.g_lat[0]) / GLORYS_RES).astype(int), 0, self.g_lat.size - 1)
        j = np.clip(np.rint((lon - self.g_lon[0]) / GLORYS_RES).astype(int), 0, self.g_lon.size - 1)
        return self.floor[i, j]

    # ---- physics ----------------------------------------------------------------------------
    @staticmethod
    def _season(lat: np.ndarray, day: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        doy = (np.asarray(day, np.float64) % 365.2425)
        # +1 in late summer of the local hemisphere, -1 in late winter.
        s = np.cos(2 * np.pi * (doy - 228.0) / 365.2425) * np.sign(lat)
        fl = np.clip(np.abs(lat) / 35.0, 0.0, 1.0)
        return s, fl

    def sst(self, lat: np.ndarray, eta: np.ndarray, day: np.ndarray | float) -> np.ndarray:
        s, fl = self._season(lat, day)
        t = -1.0 + 29.0 * np.cos(np.radians(lat)) ** 2 + 2.8 * s * fl + 1.1 * eta
        return np.maximum(t, -1.8)

    def fields_grid(self, lat: np.ndarray, lon: np.ndarray, day: float) -> np.ndarray:
        """The random fields on the lat x lon outer grid: (F, ny, nx); F = 1 (surface eddies)
        in simple mode, else surface eddies, the subsurface modes, heave, mixed-layer depth."""
        fs = [self.eddy] if self.mode == "simple" else [self.eddy, *self.sub, self.heave, self.mld_field]
        return np.stack([self._field_grid(m, lat, lon, day) for m in fs])

    def fields_pts(self, lat: np.ndarray, lon: np.ndarray, day: np.ndarray) -> np.ndarray:
        """The same fields at points: (F, n)."""
        fs = [self.eddy] if self.mode == "simple" else [self.eddy, *self.sub, self.heave, self.mld_field]
        return np.stack([self._field_pts(m, lat, lon, day) for m in fs])

    def mixed_layer_depth(self, lat: np.ndarray, f: np.ndarray, day: np.ndarray | float) -> np.ndarray:
        """v2 mixed-layer depth (m): shallow in summer, deep in late winter and at high
        latitude, times a large-scale spatial factor."""
        pr = self.params
        s, _ = self._season(lat, day)
        fl = np.clip(np.abs(lat) / 45.0, 0.0, 1.0)
        base = pr.mld_summer_m + (pr.mld_winter_m - pr.mld_summer_m) * (1 - s) / 2 * fl
        return np.clip(base * np.exp(pr.mld_spatial * f[-1]), 10.0, 400.0)

    def temperature(self, lat: np.ndarray, f: np.ndarray, day: np.ndarray | float,
                    z: np.ndarray) -> np.ndarray:
        """Potential temperature at depth z; `f` the fields (F, ...) of fields_grid/fields_pts
        broadcast against lat and z."""
        if self.mode == "simple":
            return self.profile(lat, f[0], day, z)
        pr = self.params
        eta = f[0]
        s, fl = self._season(lat, day)
        alat = np.abs(lat)
        sst = self.sst(lat, eta, day)
        sst_mean = self.sst(lat, np.zeros_like(eta), day)
        mld = self.mixed_layer_depth(lat, f, day)
        # Heave: isotherms displaced by up to heave_m, little at the surface and in the abyss.
        zeta = pr.heave_m * f[-2] * (1 - np.exp(-z / 150.0)) * np.exp(-z / 3000.0)
        zz = np.maximum(z - zeta, 0.0)
        # Mean stratification by latitude: the main thermocline is deepest under the subtropical
        # gyres (~30 deg) and shallow towards the tropics and the subpolar ocean; deep water is
        # colder at high latitude.
        hth = 180.0 + 420.0 * np.exp(-(((alat - 30.0) / 14.0) ** 2))
        deep = 0.8 + 2.0 * np.cos(np.radians(lat)) ** 2 + 3.0 * np.exp(-zz / 1300.0)
        below = np.maximum(zz - mld, 0.0)
        t = deep + (sst_mean - deep) * np.exp(-below / hth)
        # The SST eddies reach the mixed layer fully and decay below it.
        t = t + (sst - sst_mean) * np.exp(-below / pr.surface_eddy_decay_m)
        for k, (amp, zc, w, *_rest) in enumerate(pr.modes):
            t = t + amp * f[1 + k] * np.exp(-(((z - zc) / w) ** 2)) * (1 - np.exp(-z / 60.0))
        return np.maximum(t, -1.9)

    def profile(self, lat: np.ndarray, eta: np.ndarray, day: np.ndarray | float,
                z: np.ndarray) -> np.ndarray:
        """Simple mode: T at depth z (broadcast against lat/eta): mixed layer + thermocline +
        deep water, all carrying the surface eddy field."""
        s, fl = self._season(lat, day)
        sst = self.sst(lat, eta, day)
        mld = np.maximum(25.0 + 110.0 * (1 - s) / 2 * fl + 25.0 * eta, 10.0)
        hth = 220.0 + 40.0 * eta
        deep = 1.2 + 3.3 * np.exp(-z / 1200.0)
        g = np.where(z <= mld, 1.0, np.exp(-np.maximum(z - mld, 0) / hth))
        return deep + (sst - deep) * g + 0.3 * eta * np.exp(-z / 800.0) * (z > mld)

    @staticmethod
    def salinity(lat: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Practical salinity: saltier subtropical surface over ~34.9 deep water (only for the
        in-situ temperature and PSAL of the profile files)."""
        surf = 34.3 + 1.9 * np.exp(-(((np.abs(lat) - 25.0) / 15.0) ** 2))
        return 34.9 + (surf - 34.9) * np.exp(-z / 600.0)

    def glorys(self, day: int) -> np.ndarray:
        """(50, ny, nx) degC with NaN on land and below the sea floor."""
        lat2 = self.g_lat[:, None] * np.ones((1, self.g_lon.size))
        f = self.fields_grid(self.g_lat, self.g_lon, day + 0.5)
        z = GLORYS_DEPTHS[:, None, None]
        t = self.temperature(lat2[None], f[:, None], day + 0.5, z)
        t[np.broadcast_to(z > self.floor[None], t.shape)] = np.nan
        return t.astype(np.float32)

    def ostia(self, day: int, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(ny, nx) Kelvin with NaN on land and ice."""
        eta = self._field_grid(self.eddy, lat, lon, day + 0.5)
        lat2 = lat[:, None] * np.ones((1, lon.size))
        t = self.sst(lat2, eta, day + 0.5)
        err = 0.15 * self._field_grid(self.err, lat, lon, day + 0.5)
        noise = np.random.default_rng([int(day), 17]).normal(0, 0.05, t.shape)
        t = t + err + noise
        la, lo = np.meshgrid(lat, lon, indexing="ij")
        t[self.land(la, lo)] = np.nan
        t[t < -1.7] = np.nan  # sea ice: OSTIA fills it
        return (t + 273.15).astype(np.float32)

    def floats(self, first_day: int, last_day: int, per_100sqdeg: float = 8.0,
               bad_level_prob: float = 0.01, bad_profile_prob: float = 0.02) -> dict:
        """Argo-like floats between two days, as write_en4 takes them.

        Each float has a WMO-like id (platform), drifts (a red-noise velocity, ~4 km/day),
        surfaces about every 10 days and profiles to 2000 m (shallower over shelves) at
        irregular depths. The files get potential temperature (potm, the truth + 0.002 degC
        sensor noise), in-situ temperature (temp, from it with gsw) and salinity (psal,
        0.01 noise). A fraction of levels carry spikes flagged '4' in temp_qc, a fraction of
        profiles a bias flagged '4' in profile_qc, so QC has something to remove.
        """
        import gsw

        lon_min, lon_max, lat_min, lat_max = self.region
        area = (lon_max - lon_min) * (lat_max - lat_min)
        n = max(1, int(round(per_100sqdeg * area / 100.0)))
        rng = np.random.default_rng(self.rng.integers(1 << 31))
        lat = rng.uniform(lat_min, lat_max, n)
        lon = rng.uniform(lon_min, lon_max, n)
        wet = ~self.land(lat, lon)
        lat, lon = lat[wet], lon[wet]
        n = lat.size
        ids = [str(5900000 + int(k)) for k in rng.choice(100000, n, replace=False)]
        cycle = rng.uniform(9.5, 10.5, n)
        phase = rng.uniform(0, 10, n)
        vel = rng.normal(0, 4.0, (n, 2))  # km/day
        keys = ("juld", "lat", "lon", "depth", "temp", "potm", "psal", "platform", "temp_qc",
                "profile_qc")
        out: dict[str, list] = {k: [] for k in keys}
        spin = 40  # start drifting before first_day so positions are decorrelated
        next_surf = first_day - spin + phase
        for day in range(first_day - spin, last_day + 1):
            vel = 0.9 * vel + rng.normal(0, 4.0 * math.sqrt(1 - 0.81), (n, 2))
            dlat = vel[:, 1] / EARTH_KM * 180 / math.pi
            dlon = vel[:, 0] / (EARTH_KM * np.cos(np.radians(lat))) * 180 / math.pi
            nlat = np.clip(lat + dlat, lat_min, lat_max)
            nlon = np.clip(lon + dlon, lon_min, lon_max)
            ok = ~self.land(nlat, nlon)
            lat, lon = np.where(ok, nlat, lat), np.where(ok, nlon, lon)
            vel[~ok] *= -1  # bounce off the coast
            surf = (next_surf >= day) & (next_surf < day + 1)
            next_surf[surf] += cycle[surf]
            if day < first_day:
                continue
            for i in np.flatnonzero(surf):
                t_obs = next_surf[i] - cycle[i]
                bottom = min(2000.0, self.floor_at(lat[i:i + 1], lon[i:i + 1])[0] - 5.0)
                if bottom < 20.0:
                    continue
                nl = int(rng.integers(50, 110))
                z = np.sort(bottom * rng.uniform(0, 1, nl) ** 1.6 + rng.uniform(1.0, 4.0))
                z = np.round(np.minimum(z, bottom), 1)
                la, lo = lat[i:i + 1], lon[i:i + 1]
                f = self.fields_pts(la, lo, np.array([t_obs]))
                theta = self.temperature(la, f, t_obs, z)
                sp = self.salinity(la, z)
                pres = gsw.p_from_z(-z, la[0])
                sa = gsw.SA_from_SP(sp, pres, lo[0], la[0])
                insitu = gsw.t_from_CT(sa, gsw.CT_from_pt(sa, theta), pres)
                noise = rng.normal(0, 0.002, nl)  # Argo temperature accuracy
                potm, temp = theta + noise, insitu + noise
                flags = np.full(nl, b"1", "S1")
                bad = rng.random(nl) < bad_level_prob
                spike = rng.choice([-1.0, 1.0], nl) * rng.uniform(2.0, 6.0, nl)
                potm, temp = np.where(bad, potm + spike, potm), np.where(bad, temp + spike, temp)
                flags[bad] = b"4"
                pflag = b"1"
                if rng.random() < bad_profile_prob:  # e.g. a drifting sensor: whole profile off
                    potm, temp, pflag = potm + 1.5, temp + 1.5, b"4"
                out["juld"].append(t_obs)
                out["lat"].append(lat[i])
                out["lon"].append(lon[i])
                out["depth"].append(z.astype(np.float32))
                out["temp"].append(temp.astype(np.float32))
                out["potm"].append(potm.astype(np.float32))
                out["psal"].append((sp + rng.normal(0, 0.01, nl)).astype(np.float32))
                out["platform"].append(ids[i])
                out["temp_qc"].append(flags.tobytes())
                out["profile_qc"].append(pflag)
        return out


def glorys_axes(region: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """GLORYS 1/12 degree axes (global-aligned: lon -180 + k/12, lat -80 + k/12) over a region."""
    lon_min, lon_max, lat_min, lat_max = region
    i0, i1 = math.floor((lat_min + 80) / GLORYS_RES) - 1, math.ceil((lat_max + 80) / GLORYS_RES) + 1
    j0, j1 = math.floor((lon_min + 180) / GLORYS_RES) - 1, math.ceil((lon_max + 180) / GLORYS_RES) + 1
    return -80 + GLORYS_RES * np.arange(i0, i1 + 1), -180 + GLORYS_RES * np.arange(j0, j1 + 1)


def ostia_axes(region: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    lon_min, lon_max, lat_min, lat_max = region
    i0 = math.floor((lat_min + 89.975) / OSTIA_RES) - 1
    i1 = math.ceil((lat_max + 89.975) / OSTIA_RES) + 1
    j0 = math.floor((lon_min + 179.975) / OSTIA_RES) - 1
    j1 = math.ceil((lon_max + 179.975) / OSTIA_RES) + 1
    return -89.975 + OSTIA_RES * np.arange(i0, i1 + 1), -179.975 + OSTIA_RES * np.arange(j0, j1 + 1)


def _lon_axis(lon: np.ndarray, lon360: bool) -> tuple[np.ndarray, np.ndarray]:
    """File longitude values and the column order that sorts them as the file will."""
    if not lon360:
        return lon, np.arange(lon.size)
    l360 = lon % 360.0
    order = np.argsort(l360, kind="stable")
    return l360[order], order


def write_glorys(path: Path, day: int, t: np.ndarray, lat: np.ndarray, lon: np.ndarray, *,
                 lon360: bool = False, lat_descending: bool = False) -> None:
    import xarray as xr

    lon_f, order = _lon_axis(lon, lon360)
    t = t[:, :, order]
    if lat_descending:
        lat, t = lat[::-1], t[:, ::-1]
    da = xr.DataArray(t[None], dims=("time", "depth", "latitude", "longitude"),
                      attrs={"units": "degrees_C", "standard_name": "sea_water_potential_temperature"})
    ds = xr.Dataset(
        {"thetao": da},
        coords={"time": ("time", [day * 24.0], {"units": "hours since 1950-01-01", "calendar": "gregorian"}),
                "depth": ("depth", GLORYS_DEPTHS.astype(np.float32), {"units": "m", "positive": "down"}),
                "latitude": ("latitude", lat.astype(np.float32), {"units": "degrees_north"}),
                "longitude": ("longitude", lon_f.astype(np.float32), {"units": "degrees_east"})})
    # CF packing exactly as Copernicus ships GLORYS: int16, scale 7.32e-4 degC, offset 21.
    enc = {"thetao": {"dtype": "int16", "scale_factor": 0.000732444, "add_offset": 21.0,
                      "_FillValue": np.int16(-32767), "zlib": True, "complevel": 1},
           "time": {"dtype": "float64"}}
    ds.to_netcdf(path, engine="netcdf4", encoding=enc)


def write_ostia(path: Path, day: int, sst_k: np.ndarray, lat: np.ndarray, lon: np.ndarray, *,
                lon360: bool = False, lat_descending: bool = False) -> None:
    import xarray as xr

    lon_f, order = _lon_axis(lon, lon360)
    sst_k = sst_k[:, order]
    if lat_descending:
        lat, sst_k = lat[::-1], sst_k[::-1]
    mask = np.where(np.isfinite(sst_k), 1, 2).astype(np.int8)  # 1 water, 2 land/ice (extra var)
    secs = (day - yyyymmdd_to_day(19810101)) * 86400.0 + 43200.0  # 12:00 UTC like OSTIA
    ds = xr.Dataset(
        {"analysed_sst": (("time", "lat", "lon"), sst_k[None], {"units": "kelvin"}),
         "mask": (("time", "lat", "lon"), mask[None])},
        coords={"time": ("time", [secs], {"units": "seconds since 1981-01-01 00:00:00"}),
                "lat": ("lat", lat.astype(np.float32), {"units": "degrees_north"}),
                "lon": ("lon", lon_f.astype(np.float32), {"units": "degrees_east"})})
    enc = {"analysed_sst": {"dtype": "int16", "scale_factor": 0.01, "add_offset": 273.15,
                            "_FillValue": np.int16(-32768), "zlib": True, "complevel": 1},
           "time": {"dtype": "float64"}}
    ds.to_netcdf(path, engine="netcdf4", encoding=enc)


def write_en4(path: Path, prof: dict, idx: list[int]) -> None:
    """EN4-format profile file of the profiles `idx` of `prof` (lists per profile).

    `prof` holds juld, lat, lon, depth and temp (in situ) per profile, and optionally psal,
    potm (potential temperature: written as POTM_CORRECTED), platform (str), temp_qc (bytes,
    one flag per level: POTM_CORRECTED_QC) and profile_qc (one byte: PROFILE_POTM_QC), as EN4
    lays them out (docs/data_store.md#profiles-potential-temperature-and-qc).
    """
    import xarray as xr

    nl = max(len(prof["depth"][i]) for i in idx)
    n = len(idx)

    def padded(key: str, fill: float = 99999.0) -> np.ndarray:
        out = np.full((n, nl), fill, np.float32)
        for r, i in enumerate(idx):
            v = prof[key][i]
            out[r, :len(v)] = v
        return out

    temp, depth = padded("temp"), padded("depth")
    psal = padded("psal") if "psal" in prof else np.where(temp < 99999, 35.0, 99999.0).astype(np.float32)
    data = {"JULD": ("N_PROF", np.array([prof["juld"][i] for i in idx], np.float64),
                     {"units": "days since 1950-01-01 00:00:00"}),
            "LATITUDE": ("N_PROF", np.array([prof["lat"][i] for i in idx], np.float64)),
            "LONGITUDE": ("N_PROF", np.array([prof["lon"][i] for i in idx], np.float64)),
            "TEMP": (("N_PROF", "N_LEVELS"), temp, {"units": "degree_Celsius"}),
            "DEPH_CORRECTED": (("N_PROF", "N_LEVELS"), depth, {"units": "m"}),
            "PSAL_CORRECTED": (("N_PROF", "N_LEVELS"), psal)}
    floats = ["TEMP", "DEPH_CORRECTED", "PSAL_CORRECTED"]
    enc: dict = {}
    if "potm" in prof:
        data["POTM_CORRECTED"] = (("N_PROF", "N_LEVELS"), padded("potm"), {"units": "degree_Celsius"})
        floats.append("POTM_CORRECTED")
    # Character variables as EN4 has them: one string per profile, a character per level.
    if "platform" in prof:
        data["PLATFORM_NUMBER"] = ("N_PROF", np.array([prof["platform"][i] for i in idx], "S9"))
        enc["PLATFORM_NUMBER"] = {"char_dim_name": "STRING9"}
    if "temp_qc" in prof:
        qc = np.array([prof["temp_qc"][i].ljust(nl, b"0")[:nl] for i in idx], f"S{nl}")
        data["POTM_CORRECTED_QC"] = ("N_PROF", qc)
        enc["POTM_CORRECTED_QC"] = {"char_dim_name": "N_LEVELS"}
    if "profile_qc" in prof:
        data["PROFILE_POTM_QC"] = ("N_PROF", np.array([prof["profile_qc"][i] for i in idx], "S1"))
    ds = xr.Dataset(data)
    enc.update({v: {"_FillValue": np.float32(99999.0)} for v in floats})
    enc["JULD"] = {"_FillValue": 99999.0}
    # Keep JULD numeric in the file like EN4 (xarray would otherwise re-encode it).
    ds.to_netcdf(path, engine="netcdf4", encoding=enc)


def generate(out: str | Path, region: tuple[float, float, float, float] = (-33.0, -13.4, 32.2, 51.8),
             start: str = "2017-12-30", end: str = "2018-01-04", seed: int = 0,
             glorys_every: int = 1, lon360: bool = False, lat_descending: bool = False,
             floats_per_100sqdeg: float = 8.0, progress: bool = False, mode: Mode = "v2"
             ) -> dict[str, str]:
    """Write the three products for `region` (lon_min, lon_max, lat_min, lat_max) and dates.

    GLORYS is written every `glorys_every` days from `start` (and on `end`, so every day in
    range can be interpolated); OSTIA daily; EN4 monthly files covering start-3 .. end+3 days.
    Returns globs for --glorys/--ostia/--en4.
    """
    out = Path(out)
    for sub in ("glorys", "ostia", "en4"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    ocean = SyntheticOcean(region, seed, mode)
    d0, d1 = yyyymmdd_to_day(start.replace("-", "")), yyyymmdd_to_day(end.replace("-", ""))
    if d1 < d0:
        raise ValueError(f"end {end} is before start {start}")
    gdays = sorted(set(range(d0, d1 + 1, glorys_every)) | {d1})
    o_lat, o_lon = ostia_axes(region)
    days = range(d0, d1 + 1)
    it = days
    if progress:
        from tqdm import tqdm

        it = tqdm(days, desc="synthetic ocean", unit="day")
    for day in it:
        ymd = day_to_yyyymmdd(day)
        if day in gdays:
            write_glorys(out / "glorys" / f"glorys12v1_thetao_{ymd}.nc", day, ocean.glorys(day),
                         ocean.g_lat, ocean.g_lon, lon360=lon360, lat_descending=lat_descending)
        write_ostia(out / "ostia" / f"{ymd}120000-UKMO-L4_GHRSST-SSTfnd-OSTIA-GLOB_REP-v02.0-fv02.0.nc",
                    day, ocean.ostia(day, o_lat, o_lon), o_lat, o_lon, lon360=lon360,
                    lat_descending=lat_descending)
    prof = ocean.floats(d0 - 3, d1 + 3, floats_per_100sqdeg)
    months: dict[int, list[int]] = {}
    for i, j in enumerate(prof["juld"]):
        months.setdefault(day_to_yyyymmdd(int(math.floor(j))) // 100, []).append(i)
    for ym, idx in sorted(months.items()):
        write_en4(out / "en4" / f"EN.4.2.2.f.profiles.g10.{ym}.nc", prof, idx)
    return {"glorys": str(out / "glorys" / "*.nc"), "ostia": str(out / "ostia" / "*.nc"),
            "en4": str(out / "en4" / "*.nc")}


# The tiles of the tiny store: 2 x 2 tiles (stride = tile/2) anchored at the global-grid
# corner (-32.8 E, 51.6 N), in the open North-East Atlantic (Azores are the only land).
_TINY_ANCHOR = (-32.8, 51.6)


def tiny_region(tile_size: int, res: float = 0.1) -> tuple[float, float, float, float]:
    span = 1.5 * tile_size * res
    lon0, lat1 = _TINY_ANCHOR
    return (lon0 - 0.2, lon0 + span + 0.2, lat1 - span - 0.2, lat1 + 0.2)


def build_tiny_store(out_dir: str | Path, *, seed: int = 0, tile_size: int = 128,
                     start: str = "2017-12-30", end: str = "2018-01-03", val_year: int = 2018,
                     glorys_every: int = 2, shard_samples: int = 4, workers: int = 1,
                     overrides: list[str] | None = None, mode: Mode = "simple") -> Path:
    """Synthetic sources + a built store under `out_dir`; returns the store path.

    Defaults give 4 tiles (2 x 2, 50% overlap) x 5 days = 20 samples (8 train in 2017,
    12 val in 2018), 50 levels, `tile_size` pixels square (must be divisible by 16 so the
    tiles sit on the global grid; 32 or 64 make CPU tests cheap). The sources go to
    `out_dir/sources`, the store to `out_dir/store.zarr`. A complete store already there is
    reused as is. `overrides` are extra config `key=value` strings for the build. `mode`: the
    synthetic ocean (SyntheticOcean); "simple" by default, the cheap one tests rely on.
    """
    from ..config import load_config
    from .build import build_store

    if tile_size % 16:
        raise ValueError(f"tile_size {tile_size} must be divisible by 16")
    out_dir = Path(out_dir)
    store = out_dir / "store.zarr"
    if (store / "manifest.json").is_file():
        from .store import read_manifest

        if read_manifest(store)["tile_size"] != tile_size:
            raise ValueError(f"{store} exists with another tile_size; use a fresh out_dir")
        return store
    # Same number of floats per tile whatever its size, so small tiles still see profiles.
    src = generate(out_dir / "sources", tiny_region(tile_size), start, end, seed=seed,
                   glorys_every=glorys_every, floats_per_100sqdeg=8.0 * (128 / tile_size) ** 2,
                   mode=mode)
    cfg = load_config(overrides=[
        f"dataset.grid.tile_size={tile_size}", f"dataset.grid.patch_stride={tile_size // 2}",
        f"split.val_year={val_year}", f"dataset.layout.shard_samples={shard_samples}",
        *(overrides or [])])
    build_store(cfg, src["glorys"], src["ostia"], src["en4"], store, workers=workers, progress=False)
    return store


@command()
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m depthdif_hpc.data.synthetic", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--region", type=float, nargs=4, metavar=("LON_MIN", "LON_MAX", "LAT_MIN", "LAT_MAX"),
                   default=(-33.0, -13.4, 32.2, 51.8))
    p.add_argument("--start", default="2017-12-30")
    p.add_argument("--end", default="2018-01-04")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glorys-every", type=int, default=1, help="days between GLORYS files (7 = weekly)")
    p.add_argument("--floats-per-100sqdeg", type=float, default=8.0)
    p.add_argument("--lon360", action="store_true", help="write longitudes as 0..360")
    p.add_argument("--lat-descending", action="store_true", help="write latitude north to south")
    p.add_argument("--mode", choices=("v2", "simple"), default="v2",
                   help="v2: subsurface variability the surface does not show (docs/synthetic.md)")
    a = p.parse_args(argv)
    globs = generate(a.out, tuple(a.region), a.start, a.end, a.seed, a.glorys_every, a.lon360,
                     a.lat_descending, a.floats_per_100sqdeg, progress=True, mode=a.mode)
    for k, v in globs.items():
        print(f"--{k} '{v}'")


if __name__ == "__main__":
    sys.exit(main())
