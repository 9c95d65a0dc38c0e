import numpy as np
import pytest

from depthdif_hpc.config import ClimatologyConfig
from depthdif_hpc.data.store import META
from depthdif_hpc.inference import climatology as cl
from depthdif_hpc.inference.climatology import Climatology, ClimatologyAccumulator, day_of_year


def _truth(rows, cols, doy):
    """Two levels: level 0 = 10 + row/100 + 3 cos(annual) - col/50 sin(semi-annual); level 1 = 2 + col/10."""
    t = 2 * np.pi * (doy - 1) / 365
    lvl0 = 10 + rows / 100 + 3 * np.cos(t) - cols / 50 * np.sin(2 * t)
    lvl1 = 2 + cols / 10 + 0 * rows
    return np.stack([lvl0, lvl1])


def _sample(row0, col0, size, date):
    rr, cc = np.meshgrid(np.arange(row0, row0 + size), np.arange(col0, col0 + size), indexing="ij")
    return _truth(rr.astype(float), cc.astype(float), day_of_year(np.array([date]))[0])


DATES = [20170105, 20170220, 20170410, 20170601, 20170725, 20170912, 20171030, 20171215]


def test_day_of_year():
    assert day_of_year(np.array([20180101, 20180228, 20180301, 20171231])).tolist() == [1, 59, 60, 365]


def test_fit_recovers_harmonics_per_global_pixel_and_overlaps_share():
    acc = ClimatologyAccumulator(depth=2, harmonics=2, ridge=0.0, block=16)
    # two 24-pixel patches overlapping by 8 columns, at origins not aligned with the blocks
    for date in DATES:
        acc.add(_sample(100, 200, 24, date), 100, 200, date)
        acc.add(_sample(100, 216, 24, date), 100, 216, date)
    clim = acc.finish()
    for date in (20170315, 20171101):
        doy = day_of_year(np.array([date]))[0]
        got = clim.patch(100, 200, 24, 40, date)
        rr, cc = np.meshgrid(np.arange(100, 124), np.arange(200, 240), indexing="ij")
        np.testing.assert_allclose(got, _truth(rr, cc, doy), atol=1e-4)
        # a patch placed elsewhere on the same global pixels reads the same numbers
        np.testing.assert_allclose(clim.patch(108, 220, 8, 8, date), got[:, 8:16, 20:28], atol=1e-6)
    assert clim.own_fraction(100, 200, 24, 40) == 1.0


def test_uncovered_pixel_uses_domain_fit_and_partial_validity_the_time_mean():
    acc = ClimatologyAccumulator(depth=2, harmonics=1, ridge=0.0, block=16)
    for j, date in enumerate(DATES):
        s = _sample(0, 0, 16, date)
        s[1, 3, 3] = np.nan if j % 2 else 50.0 + j  # valid on even samples only: time mean 53
        acc.add(s, 0, 0, date)
    clim = acc.finish()
    assert clim.at(np.array([3]), np.array([3]), 20170301)[1, 0] == pytest.approx(np.mean([50, 52, 54, 56]))
    far = clim.at(np.array([500]), np.array([900]), 20170601)
    _, own = clim.coefficients(np.array([500]), np.array([900]))
    assert not own.any()
    # the domain fit of level 1 (no seasonal cycle) is its spatial mean 2 + mean(col)/10, but for
    # the one deviating pixel: close to it
    assert far[1, 0] == pytest.approx(2 + 7.5 / 10, abs=0.25)


def test_ridge_bounds_a_short_record():
    # six weeks of data with a cooling trend: without the ridge the harmonics can blow up
    acc = ClimatologyAccumulator(depth=1, harmonics=2, ridge=0.01, block=16)
    rng = np.random.default_rng(0)
    for k, day in enumerate(range(1120, 1132)):
        date = 20171100 + day % 100 if day % 100 <= 30 else 20171200 + day % 100 - 30
        acc.add(20 - 0.05 * k + 0.01 * rng.standard_normal((1, 16, 16)), 0, 0, date)
    clim = acc.finish()
    year = np.array([clim.at(np.array([5]), np.array([5]), 20170000 + m * 100 + 15)[0, 0]
                     for m in range(1, 13)])
    assert np.all(np.abs(year - 20) < 5)


def test_save_load_roundtrip_and_bad_file(tmp_path):
    acc = ClimatologyAccumulator(depth=2, harmonics=1, block=16)
    acc.add(_sample(0, 0, 16, 20170101), 0, 0, 20170101)
    clim = acc.finish({"store": "x"})
    p = clim.save(tmp_path / "c.npz")
    back = Climatology.load(p)
    np.testing.assert_array_equal(back.coef, clim.coef)
    assert back.attrs["store"] == "x" and not list(tmp_path.glob(".*tmp*"))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="bad.npz"):
        Climatology.load(tmp_path / "bad.npz")


def test_store_fit_is_streamed_cached_and_reused(tiny_store, tmp_path, monkeypatch):
    cfg = ClimatologyConfig(harmonics=1)
    path = tmp_path / "clim.npz"
    clim, where = cl.load_or_fit(tiny_store, cfg, path)
    assert where == path and path.is_file()
    # the fit equals the direct per-pixel mean where the train split has one date per pixel
    i, t, row = next(cl.iter_split_fields(tiny_store, "train"))
    t = t[1:]
    pred = clim.patch(int(row[META["row0"]]), int(row[META["col0"]]), t.shape[1], t.shape[2],
                      int(row[META["date"]]))
    ok = np.isfinite(t)
    assert np.abs(pred[ok] - t[ok]).mean() < 0.5
    # second call: read from the cache, no refit
    monkeypatch.setattr(cl, "fit_store", lambda *a, **k: pytest.fail("refitted"))
    again, _ = cl.load_or_fit(tiny_store, cfg, path)
    np.testing.assert_array_equal(again.coef, clim.coef)
    # other settings: a refit (here: the patched function fails the test if reached)
    with pytest.raises(pytest.fail.Exception):
        cl.load_or_fit(tiny_store, ClimatologyConfig(harmonics=2), path)
