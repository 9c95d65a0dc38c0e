"""Patch grid (docs/model.md#patch-grid): candidates, centres, land-fraction filter and forced
regions."""

from __future__ import annotations

import numpy as np

from depthdif_hpc.data.build import select_tiles
from depthdif_hpc.data.grid import Tile, candidate_tiles, tile_starts
from depthdif_hpc.data.readers import GridSource
from depthdif_hpc.data.synthetic import main as synthetic_main

from .conftest import tiny_config


def test_reference_candidate_count_and_pixel_centres():
    assert len(tile_starts(1800, 128, 64)) == 28 and len(tile_starts(3600, 128, 64)) == 56
    assert tile_starts(1800, 128, 64)[-1] == 1800 - 128  # the last valid tile is included
    assert len(candidate_tiles(128, 64, 0.1)) == 1568
    t = Tile(0, 384, 1472, 128, 0.1)
    assert np.isclose(t.top, 51.6) and np.isclose(t.left, -32.8)
    assert np.isclose(t.pixel_lats()[0], 51.55) and np.isclose(t.pixel_lons()[-1], -20.05)
    assert np.allclose(t.centre(), (45.2, -26.4))
    # Across the dateline the circular mean of the edge longitudes is used: 173.6 .. -173.6.
    d = Tile(1, 0, 3536, 128, 0.1)
    assert np.isclose(d.left, 173.6) and np.isclose(abs(d.centre()[1]), 180.0)


def test_land_fraction_filter_and_forced_region(tmp_path):
    # Spain/France coast: tiles of 1.6 deg (16 px) with very different land fractions.
    synthetic_main(["--out", str(tmp_path), "--region", "-3.5", "3.5", "39.5", "44.5",
                    "--start", "2018-02-01", "--end", "2018-02-01", "--floats-per-100sqdeg", "1"])
    g = GridSource.scan([str(p) for p in (tmp_path / "glorys").glob("*.nc")], "thetao", "glorys")
    o = GridSource.scan([str(p) for p in (tmp_path / "ostia").glob("*.nc")], "analysed_sst", "ostia")
    base = ["dataset.grid.tile_size=16", "dataset.grid.patch_stride=8"]

    def land(t: Tile) -> float:
        return float(np.isnan(g.interp(g.days[0], t.pixel_lats(), t.pixel_lons(), slice(0, 1))).mean())

    every = select_tiles(tiny_config(*base, "dataset.grid.max_land_fraction=1.0"), g, o)
    strict = select_tiles(tiny_config(*base, "dataset.grid.max_land_fraction=0.3"), g, o)
    fractions = {t.tile_id: land(t) for t in every}
    assert min(fractions.values()) < 0.3 < max(fractions.values())
    assert {t.tile_id for t in strict} == {k for k, f in fractions.items() if f <= 0.3}
    # Forced region: tiles centred in the box pass up to its own limit, others are unchanged.
    box = "{name: east, lon_min: 0.0, lon_max: 4.0, lat_min: 39.0, lat_max: 45.0, max_land_fraction: 0.9}"
    forced = select_tiles(tiny_config(*base, "dataset.grid.max_land_fraction=0.3",
                                      f"dataset.grid.force_include_regions=[{box}]"), g, o)
    extra = {t.tile_id for t in forced} - {t.tile_id for t in strict}
    assert extra, "the forced region should admit some coastal tiles"
    for t in forced:
        lat, lon = t.centre()
        assert fractions[t.tile_id] <= (0.9 if 0.0 <= lon <= 4.0 else 0.3)
        if t.tile_id in extra:
            assert 0.3 < fractions[t.tile_id] <= 0.9 and 0.0 <= lon <= 4.0
    # bbox keeps only tiles inside it
    boxed = select_tiles(tiny_config(*base, "dataset.grid.max_land_fraction=1.0",
                                     "dataset.grid.bbox=[-3.0,0.0,40.0,44.0]"), g, o)
    assert boxed and all(-3.0 <= t.left and t.right <= 0.0 + 1e-9 for t in boxed)
