"""Source readers on generated files: CF packing, fill values, lon/lat conventions, errors."""

from __future__ import annotations

import warnings

import netCDF4
import numpy as np
import pytest
import xarray as xr

from depthdif_hpc.data.profiles import GLORYS_DEPTHS
from depthdif_hpc.data.readers import GridSource, SourceError, read_en4, to_days, yyyymmdd_to_day
from depthdif_hpc.data.synthetic import (
    SyntheticOcean,
    generate,
    glorys_axes,
    write_en4,
    write_glorys,
    write_ostia,
)

# Straddles the Greenwich meridian (0..360 files wrap inside it) and has coast (Spain/France).
REGION = (-3.0, 3.0, 40.0, 44.0)
DAY = yyyymmdd_to_day(20180115)


@pytest.fixture(scope="module")
def field():
    ocean = SyntheticOcean(REGION, seed=3)
    return ocean, ocean.glorys(DAY)


def _write_pair(tmp_path, ocean, t):
    a, b = tmp_path / "std.nc", tmp_path / "wrapped.nc"
    write_glorys(a, DAY, t, ocean.g_lat, ocean.g_lon)
    write_glorys(b, DAY, t, ocean.g_lat, ocean.g_lon, lon360=True, lat_descending=True)
    return a, b


def test_glorys_cf_packing_and_fill(tmp_path, field):
    ocean, t = field
    a, _ = _write_pair(tmp_path, ocean, t)
    with netCDF4.Dataset(a) as nc:  # the file really is CF-packed int16
        v = nc["thetao"]
        assert v.dtype == np.int16 and v.scale_factor == pytest.approx(0.000732444)
        assert v._FillValue == -32767
    src = GridSource.scan([str(a)], "thetao", "glorys")
    # Targets exactly on source points away from NaN neighbours: the decoded value must be the
    # original within half the packing step.
    wet = np.isfinite(t[20])
    i, j = next((i, j) for i in range(wet.shape[0] - 12) for j in range(wet.shape[1] - 12)
                if wet[i:i + 12, j:j + 12].all())
    rows, cols = np.arange(i + 1, i + 11), np.arange(j + 1, j + 11)
    got = src.interp(DAY, ocean.g_lat[rows], ocean.g_lon[cols])
    want = t[:, rows][:, :, cols]
    both = np.isfinite(want) & np.isfinite(got)
    assert both[:20].all()
    assert np.abs(got[both] - want[both]).max() <= 0.000732444 / 2 + 1e-5
    # Fill: land columns are NaN at every level, deep levels below the sea floor NaN.
    full = src.interp(DAY, ocean.g_lat[1:-1], ocean.g_lon[1:-1])
    land = ocean.land(*np.meshgrid(ocean.g_lat[1:-1], ocean.g_lon[1:-1], indexing="ij"))
    assert land.any() and np.isnan(full[:, land]).all()
    assert np.isnan(full[-1]).mean() > np.isnan(full[0]).mean()


def test_lon_360_and_descending_lat_read_the_same(tmp_path, field):
    ocean, t = field
    a, b = _write_pair(tmp_path, ocean, t)
    with netCDF4.Dataset(b) as nc:
        assert nc["longitude"][:].min() >= 0 and nc["latitude"][0] > nc["latitude"][-1]
    sa = GridSource.scan([str(a)], "thetao", "glorys")
    sb = GridSource.scan([str(b)], "thetao", "glorys")
    lats = np.linspace(40.3, 43.7, 23)
    lons = np.linspace(-2.7, 2.7, 31)  # crosses 0: two hyperslabs in the 0..360 file
    ra, rb = sa.interp(DAY, lats, lons), sb.interp(DAY, lats, lons)
    assert np.isfinite(ra).sum() > 1000
    np.testing.assert_array_equal(np.isnan(ra), np.isnan(rb))
    # float32 file coordinates: 359.9 carries less precision than -0.1, hence 1e-4.
    np.testing.assert_allclose(ra[np.isfinite(ra)], rb[np.isfinite(rb)], atol=1e-4)
    # ... and both agree with xarray's own interpolation of the decoded file.
    with xr.open_dataset(a) as ds:
        ref = ds.thetao.isel(time=0).interp(latitude=lats, longitude=lons).values
    fin = np.isfinite(ref) & np.isfinite(ra)
    assert fin.sum() > 0.95 * np.isfinite(ref).sum()
    np.testing.assert_allclose(ra[fin], ref[fin], atol=1e-4)


def test_time_interpolation_between_steps(tmp_path, field):
    ocean, _ = field
    t0, t2 = ocean.glorys(DAY), ocean.glorys(DAY + 2)
    write_glorys(tmp_path / "a.nc", DAY, t0, ocean.g_lat, ocean.g_lon)
    write_glorys(tmp_path / "b.nc", DAY + 2, t2, ocean.g_lat, ocean.g_lon)
    src = GridSource.scan([str(tmp_path / "a.nc"), str(tmp_path / "b.nc")], "thetao", "glorys")
    lat, lon = ocean.g_lat[20:22], ocean.g_lon[40:42]
    mid = src.interp(DAY + 1, lat, lon)
    want = 0.5 * (src.interp(DAY, lat, lon) + src.interp(DAY + 2, lat, lon))
    np.testing.assert_allclose(mid, want, atol=1e-5, equal_nan=True)
    with pytest.raises(SourceError, match="outside the files' time range"):
        src.interp(DAY + 3, lat, lon)


def test_ostia_kelvin_to_celsius_and_fill(tmp_path):
    ocean = SyntheticOcean(REGION, seed=1)
    lat = np.round(np.arange(40.025, 44.0, 0.05), 3)
    lon = np.round(np.arange(-2.975, 3.0, 0.05), 3)
    sst = ocean.ostia(DAY, lat, lon)
    assert np.nanmedian(sst) > 270  # written in Kelvin
    write_ostia(tmp_path / "o.nc", DAY, sst, lat, lon, lon360=True)
    src = GridSource.scan([str(tmp_path / "o.nc")], "analysed_sst", "ostia")
    got = src.interp(DAY, lat[5:60], lon[5:100])
    want = sst[5:60, 5:100] - 273.15
    sea = np.isfinite(want)
    assert np.isnan(got[~sea]).all() and (~sea).sum() > 50  # land stays fill/NaN
    both = sea & np.isfinite(got)  # points next to land are NaN too (no interp across coast)
    assert both.sum() > 0.9 * sea.sum()
    assert np.abs(got[both] - want[both]).max() <= 0.005 + 1e-4  # 0.01 K packing


def test_en4_fill_values_and_times(tmp_path):
    prof = {"juld": [DAY + 0.25, DAY + 1.75], "lat": [41.0, 42.0], "lon": [-1.0, 359.5],
            "depth": [np.array([5.0, 10.0, 20.0], np.float32), np.array([3.0], np.float32)],
            "temp": [np.array([15.0, 14.5, 13.0], np.float32), np.array([16.0], np.float32)]}
    path = tmp_path / "en4.nc"
    write_en4(path, prof, [0, 1])
    with netCDF4.Dataset(path) as nc:
        nc.set_auto_mask(False)
        assert nc["TEMP"][1, 1] == 99999.0  # padding is the EN4 fill value on disk
    p = read_en4(str(path))
    assert p.temp.shape == (2, 3) and np.isnan(p.temp[1, 1:]).all() and np.isnan(p.depth[1, 1:]).all()
    np.testing.assert_allclose(p.juld, [DAY + 0.25, DAY + 1.75])
    np.testing.assert_allclose(p.lon, [-1.0, -0.5])  # 359.5 -> -0.5
    # Times decoded by xarray (datetime64) and raw CF numbers give the same days.
    with xr.open_dataset(path) as ds:
        assert np.issubdtype(ds.JULD.dtype, np.datetime64)
        np.testing.assert_allclose(to_days(ds.JULD.values, None, "x"), p.juld, atol=1e-6)
    assert to_days(np.array([48.0]), "hours since 1950-01-03 12:00:00", "x")[0] == 4.5


def test_rejects_unusable_files_naming_file_and_variable(tmp_path, field):
    ocean, t = field
    a, _ = _write_pair(tmp_path, ocean, t)
    with pytest.raises(SourceError, match=r"std\.nc.*'votemper' not found"):
        GridSource.scan([str(a)], "votemper", "glorys")
    bad = tmp_path / "levels.nc"
    ds = xr.open_dataset(a).isel(depth=slice(0, 30))
    ds.to_netcdf(bad)
    ds.close()
    with pytest.raises(SourceError, match=r"levels\.nc.*'thetao' has 30 depth levels"):
        GridSource.scan([str(bad)], "thetao", "glorys")
    en4 = tmp_path / "noprof.nc"
    xr.Dataset({"JULD": ("N_PROF", [1.0]), "LATITUDE": ("N_PROF", [1.0]),
                "LONGITUDE": ("N_PROF", [1.0])}).to_netcdf(en4)
    with pytest.raises(SourceError, match=r"noprof\.nc.*'TEMP' not found"):
        read_en4(str(en4))
    junk = tmp_path / "junk.nc"
    junk.write_text("not netcdf")
    with pytest.raises(SourceError, match=r"junk\.nc.*cannot open"):
        GridSource.scan([str(junk)], "thetao", "glorys")


def test_generator_products_are_consistent(tmp_path):
    globs = generate(tmp_path, (-20.2, -16.6, 40.0, 43.6), "2018-03-01", "2018-03-03", seed=5,
                     floats_per_100sqdeg=150)
    g = GridSource.scan(sorted((tmp_path / "glorys").glob("*.nc")), "thetao", "glorys")
    o = GridSource.scan(sorted((tmp_path / "ostia").glob("*.nc")), "analysed_sst", "ostia")
    lats, lons = np.linspace(40.5, 43, 20), np.linspace(-19.5, -17, 20)
    d = yyyymmdd_to_day(20180302)
    y, eo = g.interp(d, lats, lons), o.interp(d, lats, lons)
    diff = (eo - y[0])[np.isfinite(eo) & np.isfinite(y[0])]
    assert 0.01 < np.abs(diff).mean() < 0.5  # OSTIA close to, but not equal to, GLORYS surface
    col = np.array([np.nanmean(v) if np.isfinite(v).any() else np.nan for v in y])
    assert col[0] > col[25] > col[40]  # warm surface, thermocline, cold deep water
    assert (np.diff(g.days) == 1).all() and globs["en4"].endswith("*.nc")
    files = sorted((tmp_path / "en4").glob("*.nc"))
    ps = [read_en4(str(f)) for f in files]
    assert sum(p.juld.size for p in ps) > 5
    assert max(np.nanmax(p.depth) for p in ps) > 1000 and max(np.nanmax(p.depth) for p in ps) <= 2000
    # EN4's variables: in-situ TEMP is warmer than POTM_CORRECTED at depth (pressure heating),
    # each profile has its float's id, and flagged spikes are there for QC to remove.
    raw = read_en4(str(files[0]), temperature="in_situ", qc="none")
    pot = read_en4(str(files[0]), qc="none")
    assert pot.temperature_source == "POTM_CORRECTED" and raw.temperature_source == "TEMP"
    deep = (raw.depth > 1500) & (np.abs(raw.temp - pot.temp) < 1.0)
    assert deep.any() and (raw.temp[deep] - pot.temp[deep]).min() > 0.05
    assert all(len(x) == 7 for p in ps for x in p.platform)
    assert sum(p.qc_rejected_levels for p in ps) > 0
    assert len(GLORYS_DEPTHS) == 50 and glorys_axes((0, 1, 0, 1))[0].size > 12


def test_synthetic_eddies_move_evolve_and_have_a_mesoscale_spectrum():
    ocean = SyntheticOcean((-40.0, -20.0, 30.0, 50.0), seed=11)
    lat = np.linspace(32, 48, 192)
    lon = np.linspace(-38, -22, 192)
    f0 = ocean._field_grid(ocean.eddy, lat, lon, 100.0)
    corr = lambda a, b: float(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    day1, day30 = ocean._field_grid(ocean.eddy, lat, lon, 101.0), ocean._field_grid(ocean.eddy, lat, lon, 130.0)
    assert 0.8 < corr(f0, day1) < 0.9999 and corr(f0, day30) < corr(f0, day1) - 0.2
    # Westward drift: after 30 days the best-matching shift of the old field is to the west.
    shifts = range(-12, 13)
    best = max(shifts, key=lambda s: corr(np.roll(f0, s, axis=1)[:, 15:-15], day30[:, 15:-15]))
    assert best < 0
    # Energy spectrum slope between 60 and 400 km wavelengths is near -3 (between -4 and -2).
    spec = np.abs(np.fft.rfft(f0 - f0.mean(axis=1, keepdims=True), axis=1)) ** 2
    dx = 16 / 191 * 111.0 * np.cos(np.radians(40))  # km per column
    k = np.fft.rfftfreq(192, dx)
    band = (k > 1 / 400) & (k < 1 / 60)
    slope = np.polyfit(np.log(k[band]), np.log(spec.mean(axis=0)[band]), 1)[0]
    assert -4.0 < slope < -2.0


def test_regional_grid_across_the_dateline(tmp_path):
    # Fiji: a regional file whose longitudes run 176..184 (written as-is, i.e. past 180).
    region = (176.0, 184.0, -20.0, -14.0)
    ocean = SyntheticOcean(region, seed=2)
    t = ocean.glorys(DAY)
    path = tmp_path / "fiji.nc"
    write_glorys(path, DAY, t, ocean.g_lat, ocean.g_lon)
    src = GridSource.scan([str(path)], "thetao", "glorys")
    lats = np.linspace(-19.0, -15.0, 9)
    lons = np.array([178.05, 179.95, -179.95, -178.05])  # a tile crossing 180
    assert src.covers(lats, lons) and not src.covers(lats, np.array([170.0, 171.0]))
    got = src.interp(DAY, lats, lons)
    with xr.open_dataset(path) as ds:
        ref = ds.thetao.isel(time=0).interp(latitude=lats, longitude=lons % 360.0).values
    fin = np.isfinite(ref) & np.isfinite(got)
    assert fin.sum() > 0.9 * np.isfinite(ref).sum() > 0
    np.testing.assert_allclose(got[fin], ref[fin], atol=1e-4)
    # A grid with a hole in longitude cannot be interpolated across: refused by name.
    gap = tmp_path / "gap.nc"
    keep = np.r_[0:30, 40:ocean.g_lon.size]
    write_glorys(gap, DAY, t[:, :, keep], ocean.g_lat, ocean.g_lon[keep])
    with pytest.raises(SourceError, match=r"gap\.nc.*'thetao': longitude has gaps"):
        GridSource.scan([str(gap)], "thetao", "glorys")


def test_v2_subsurface_is_not_the_surface_scaled():
    # Anomalies from each latitude row's mean: in "simple" the 1062 m field is the surface
    # eddy field scaled (corr ~0.96); in "v2" its own modes and heave dominate.
    region = (-32.0, -25.0, 42.0, 49.0)
    corr = {}
    for mode in ("simple", "v2"):
        ocean = SyntheticOcean(region, seed=0, mode=mode)
        t = ocean.glorys(DAY).astype(np.float64)
        with warnings.catch_warnings():  # rows of land or below the sea floor: NaN, as wanted
            warnings.simplefilter("ignore", RuntimeWarning)
            a = t - np.nanmean(t, axis=2, keepdims=True)
        k = int(np.argmin(np.abs(GLORYS_DEPTHS - 1062.44)))
        ok = np.isfinite(a[0]) & np.isfinite(a[k])
        corr[mode] = float(np.corrcoef(a[0][ok], a[k][ok])[0, 1])
        if mode == "v2":
            assert 0.05 < np.nanstd(a[k]) < 0.5  # a deep signal of about a tenth of a degree
            lat2 = ocean.g_lat[:, None] * np.ones((1, ocean.g_lon.size))
            f = ocean.fields_grid(ocean.g_lat, ocean.g_lon, DAY)
            mld = ocean.mixed_layer_depth(lat2, f, DAY)
            assert 15 < mld.min() and mld.max() < 400 and mld.max() > 2 * mld.min()
    assert corr["simple"] > 0.9 and abs(corr["v2"]) < 0.4
