"""Vertical alignment (docs/model.md#vertical-alignment) against hand-worked profiles, and
rasterisation."""

from __future__ import annotations

import numpy as np

from depthdif_hpc.data.profiles import (
    GLORYS_DEPTHS,
    PLATFORM_MORE,
    PLATFORM_NONE,
    align_profile,
    pixel_of,
    pixel_platforms,
    rasterize,
)


def test_linear_interpolation_inside_the_profile():
    # Samples at 0, 10, 20 m with 20, 18, 14 degC. Level 5.078 m: 20 - 2 * 5.078/10 = 18.9844.
    # Level 15.81 m: 18 - 4 * 5.81/10 = 15.676. Level 0.494: 20 - 0.2*0.494 = 19.9012.
    out = align_profile(np.array([0.0, 10.0, 20.0]), np.array([20.0, 18.0, 14.0]))
    assert np.isclose(out[0], 19.9012)
    assert np.isclose(out[4], 18.9844)
    assert np.isclose(out[10], 15.676)
    # 21.599 m is below the deepest sample (20 m): no extrapolation.
    assert np.isfinite(out[:12]).all() and np.isnan(out[12:]).all()


def test_nearest_observation_gate():
    # Samples at 100 and 300 m. Level 155.851: nearest obs 55.851 m away > max(15.59, 10) -> rejected.
    # Level 109.729: nearest 9.729 <= 10.97 -> accepted: 10 - 5 * 9.729/200 = 9.756775.
    # Level 266.04: nearest 33.96 <= 26.6? no -> rejected. Level 318.127 outside [100, 300].
    out = align_profile(np.array([100.0, 300.0]), np.array([10.0, 5.0]))
    i = {round(z, 3): k for k, z in enumerate(GLORYS_DEPTHS)}
    assert np.isclose(out[i[109.729]], 9.756775)
    assert np.isnan(out[i[155.851]]) and np.isnan(out[i[266.04]]) and np.isnan(out[i[318.127]])
    assert np.isfinite(out).sum() == 1


def test_sorting_duplicates_fill_and_negative_depths():
    # Unsorted, a duplicate depth (averaged: 11 and 13 -> 12 at 5.078 m), a NaN temp, a
    # negative depth: all handled before interpolation.
    depth = np.array([6.441, 5.078, 5.078, -1.0, 3.819, np.nan])
    temp = np.array([10.0, 11.0, 13.0, 99.0, 14.0, 1.0])
    out = align_profile(depth, temp)
    assert np.isclose(out[3], 14.0)  # 3.819 exact
    assert np.isclose(out[4], 12.0)  # duplicate average
    assert np.isclose(out[5], 10.0)
    assert np.isnan(out[:3]).all() and np.isnan(out[6:]).all()


def test_single_sample_fills_only_an_exact_level():
    out = align_profile(np.array([9.573]), np.array([7.5]))
    assert np.isclose(out[7], 7.5) and np.isfinite(out).sum() == 1
    out = align_profile(np.array([9.6]), np.array([7.5]))
    assert np.isnan(out).all()


def test_pixel_of_half_open_and_dateline():
    # Patch top 10 N, left 170 E, 0.1 deg, 128 px: lat in (-2.8, 10], lon in [170, 182.8).
    lat = np.array([10.0, 9.95, -2.8, 5.0, 5.0, 5.0])
    lon = np.array([170.0, 170.05, 171.0, -177.25, 182.8 - 360.0, 169.99])
    r, c, ok = pixel_of(lat, lon, 10.0, 170.0, 0.1, 128)
    assert ok.tolist() == [True, True, False, True, False, False]
    assert (r[0], c[0]) == (0, 0) and (r[1], c[1]) == (0, 0)
    assert (r[3], c[3]) == (50, 127)  # across the dateline: -177.25 = 182.75


def test_rasterize_averages_profiles_in_one_pixel():
    a = np.full((3, 50), np.nan, np.float32)
    a[0, :2] = [10.0, 9.0]
    a[1, :3] = [12.0, np.nan, 8.0]
    a[2, 0] = 1.0
    pix, vals = rasterize(a, np.array([4, 4, 1]), np.array([7, 7, 2]))
    assert pix.tolist() == [[1, 2], [4, 7]]
    assert vals[1, 0] == 11.0 and vals[1, 1] == 9.0 and vals[1, 2] == 8.0
    assert np.isnan(vals[1, 3:]).all() and vals[0, 0] == 1.0


def test_pixel_platforms_follow_rasterize_and_mark_overflow():
    a = np.full((7, 50), np.nan, np.float32)
    a[:, 0] = 1.0
    a[2] = np.nan  # no finite level: contributes no data, so not its platform either
    rows = np.array([4, 4, 4, 1, 0, 0, 0])
    cols = np.array([7, 7, 7, 2, 0, 0, 0])
    plat = np.array([9, 3, 5, 3, 1, 2, 3])
    pix, _ = rasterize(a, rows, cols)
    ids = pixel_platforms(a, rows, cols, plat, slots=2)
    assert pix.tolist() == [[0, 0], [1, 2], [4, 7]]
    # (0, 0) holds three platforms in two slots: one id and PLATFORM_MORE.
    assert ids.tolist() == [[1, PLATFORM_MORE], [3, PLATFORM_NONE], [3, 9]]
