"""EN4 profiles: potential temperature (POTM_CORRECTED or computed with gsw) and QC flags, on
hand-made files (docs/data_store.md#profiles-potential-temperature-and-qc)."""

from __future__ import annotations

import gsw
import numpy as np
import pytest

from depthdif_hpc.data.readers import potential_temperature, read_en4
from depthdif_hpc.data.synthetic import write_en4

# TEOS-10 check values (gsw's gsw_cv_v3_0 check cast 1: 11 N, 142 E): practical salinity,
# in-situ temperature, sea pressure and the potential temperature pt0_from_t must return.
CHECK_SP = np.array([34.306287392599714, 34.821654999994536, 34.532505000117716,
                     34.65227899985398, 34.714921169561336])
CHECK_T = np.array([27.962, 18.178, 4.9176, 1.7713000000000008, 1.5997999999999999])
CHECK_P = np.array([0.0, 176.0, 909.0, 2534.0, 6131.0])
CHECK_PT0 = np.array([27.962, 18.147615154162335, 4.842769286438453, 1.5919261126559991,
                      1.0143937831023524])
CHECK_LAT, CHECK_LON = 11.0, 142.0


def test_potential_temperature_matches_the_teos10_check_values():
    depth = -gsw.z_from_p(CHECK_P, CHECK_LAT)  # the reader takes depth; gsw maps it back
    pt = potential_temperature(CHECK_T[None], CHECK_SP[None], depth[None],
                               np.array([CHECK_LAT]), np.array([CHECK_LON]))[0]
    np.testing.assert_allclose(pt, CHECK_PT0, atol=1e-6, rtol=0)
    # The correction is what matters: 0 at the surface, 0.59 degC at 6131 dbar.
    assert pt[0] == pytest.approx(CHECK_T[0]) and CHECK_T[-1] - pt[-1] > 0.5


def _profiles(**extra) -> dict:
    depth = -gsw.z_from_p(CHECK_P, CHECK_LAT)
    prof = {"juld": [10.0, 11.0, 12.0, 13.0], "lat": [CHECK_LAT] * 4, "lon": [CHECK_LON] * 4,
            "depth": [depth] * 4, "temp": [CHECK_T] * 4, "psal": [CHECK_SP] * 4,
            "platform": ["5901001", "5901002", "5901003", "5901004"]}
    prof.update(extra)
    return prof


def test_potm_corrected_is_used_when_present_else_computed(tmp_path):
    potm = CHECK_PT0 + 0.01  # distinguishable from the computed value
    with_potm, without = tmp_path / "potm.nc", tmp_path / "insitu.nc"
    write_en4(with_potm, _profiles(potm=[potm] * 4), [0, 1, 2, 3])
    write_en4(without, _profiles(), [0, 1, 2, 3])
    p = read_en4(str(with_potm))
    assert p.temperature_source == "POTM_CORRECTED"
    np.testing.assert_allclose(p.temp, np.tile(potm, (4, 1)), atol=1e-5)
    q = read_en4(str(without))
    assert q.temperature_source == "TEMP+PSAL_CORRECTED (gsw pt0)"
    np.testing.assert_allclose(q.temp, np.tile(CHECK_PT0, (4, 1)), atol=2e-5)  # float32 file
    r = read_en4(str(with_potm), temperature="in_situ")
    assert r.temperature_source == "TEMP"
    np.testing.assert_allclose(r.temp, np.tile(CHECK_T, (4, 1)), atol=1e-5)
    assert list(p.platform) == ["5901001", "5901002", "5901003", "5901004"]


def test_missing_salinity_uses_the_assumed_value(tmp_path):
    psal = CHECK_SP.copy()
    psal[3] = np.nan  # fill in the file
    path = tmp_path / "nosal.nc"
    write_en4(path, _profiles(psal=[psal] * 4), [0, 1, 2, 3])
    p = read_en4(str(path))
    assert p.salinity_assumed_levels == 4
    want = gsw.pt0_from_t(gsw.SA_from_SP(35.0, CHECK_P[3], CHECK_LON, CHECK_LAT), CHECK_T[3], CHECK_P[3])
    np.testing.assert_allclose(p.temp[:, 3], want, atol=2e-5)
    np.testing.assert_allclose(p.temp[:, [0, 1, 2, 4]], np.tile(CHECK_PT0[[0, 1, 2, 4]], (4, 1)), atol=2e-5)


def test_qc_drops_exactly_the_flagged_profiles_and_levels(tmp_path):
    potm = [CHECK_PT0 + k for k in range(4)]
    prof = _profiles(potm=potm, temp_qc=[b"11111", b"14111", b"11114", b"41111"],
                     profile_qc=[b"1", b"1", b"4", b"0"])
    path = tmp_path / "qc.nc"
    write_en4(path, prof, [0, 1, 2, 3])
    p = read_en4(str(path))
    # Profile 2 is rejected whole (PROFILE_POTM_QC '4'); the others keep all levels but the
    # ones flagged '4': profile 1 level 1, profile 3 level 0.
    assert list(p.platform) == ["5901001", "5901002", "5901004"]
    assert p.qc_rejected_profiles == 1 and p.qc_rejected_levels == 2
    want = np.stack([potm[0], potm[1], potm[3]]).astype(np.float32)
    want[1, 1] = np.nan
    want[2, 0] = np.nan
    np.testing.assert_array_equal(np.isnan(p.temp), np.isnan(want))
    np.testing.assert_allclose(p.temp[~np.isnan(want)], want[~np.isnan(want)], atol=1e-5)
    # positions_only (the build's index pass) applies the profile flags and counts the same.
    pos = read_en4(str(path), positions_only=True)
    assert list(pos.platform) == list(p.platform) and pos.qc_rejected_levels == 2
    # qc="none" keeps everything.
    raw = read_en4(str(path), qc="none")
    assert raw.temp.shape == (4, 5) and np.isfinite(raw.temp).all() and raw.qc_rejected_profiles == 0
