"""The 0.1 degree patch grid (docs/model.md#patch-grid) and bilinear interpolation onto patch
pixels.

The global grid is 1800 x 3600 pixels with origin (-180, 90); tile starts are multiples of the
stride plus, always, the last start that still fits, so a tile id is stable for any region.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tile:
    """One patch: `row0`/`col0` index the global 0.1 degree grid (row 0 = 90 N)."""

    tile_id: int
    row0: int
    col0: int
    size: int
    res: float

    @property
    def top(self) -> float:
        return 90.0 - self.row0 * self.res

    @property
    def bottom(self) -> float:
        return self.top - self.size * self.res

    @property
    def left(self) -> float:
        return -180.0 + self.col0 * self.res

    @property
    def right(self) -> float:
        return self.left + self.size * self.res

    def pixel_lats(self) -> np.ndarray:
        """Pixel-centre latitudes, row order (descending)."""
        return self.top - self.res / 2 - self.res * np.arange(self.size)

    def pixel_lons(self) -> np.ndarray:
        """Pixel-centre longitudes in [-180, 180)."""
        return wrap_lon(self.left + self.res / 2 + self.res * np.arange(self.size))

    def centre(self) -> tuple[float, float]:
        """[lat, lon] as in docs/model.md#batch-contract: mean of the lat bounds, circular mean of
        the edge lons."""
        lat = (self.top + self.bottom) / 2
        a, b = math.radians(self.left), math.radians(self.right)
        lon = math.degrees(math.atan2(math.sin(a) + math.sin(b), math.cos(a) + math.cos(b)))
        return lat, lon


def wrap_lon(lon: np.ndarray | float) -> np.ndarray:
    """Longitudes to [-180, 180)."""
    return (np.asarray(lon, dtype=np.float64) + 180.0) % 360.0 - 180.0


def tile_starts(n: int, tile: int, stride: int) -> list[int]:
    """Start indices along one axis; the last fitting tile is always included."""
    starts = list(range(0, n - tile + 1, stride))
    if starts and starts[-1] != n - tile:
        starts.append(n - tile)
    return starts


def candidate_tiles(tile: int, stride: int, res: float,
                    lat_range: tuple[float, float] | None = None) -> list[Tile]:
    """Global candidate tiles, ids in row-major order of their starts.

    With `lat_range` only tiles lying inside it are built (ids stay the global ones): small
    tiles give ~10^5 candidates, most of them far from a regional source.
    """
    nrows, ncols = round(180 / res), round(360 / res)
    rows, cols = tile_starts(nrows, tile, stride), tile_starts(ncols, tile, stride)
    out = []
    for i, r in enumerate(rows):
        if lat_range is not None:
            top, bottom = 90.0 - r * res, 90.0 - (r + tile) * res
            if bottom < lat_range[0] - 1e-9 or top > lat_range[1] + 1e-9:
                continue
        for j, c in enumerate(cols):
            out.append(Tile(i * len(cols) + j, r, c, tile, res))
    return out


def in_box(lat: float, lon: float, lon_min: float, lon_max: float, lat_min: float,
           lat_max: float) -> bool:
    """Point in a lon/lat box; a box with lon_min > lon_max crosses the dateline."""
    lon = float(wrap_lon(lon))
    if not lat_min <= lat <= lat_max:
        return False
    if lon_min <= lon_max:
        return lon_min <= lon <= lon_max
    return lon >= lon_min or lon <= lon_max


def bracket_axis(src: np.ndarray, tgt: np.ndarray, periodic: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left neighbour index, weight of the right neighbour, and validity for linear interp.

    `src` must be strictly ascending. With `periodic` (global longitude) the right neighbour
    of the last point is the first one (index n, to be taken modulo n by the caller).
    """
    n = src.size
    if periodic:
        period = 360.0
        ext = np.concatenate([src, [src[0] + period]])
        t = (tgt - src[0]) % period + src[0]
        i0 = np.clip(np.searchsorted(ext, t, side="right") - 1, 0, n - 1)
        w = (t - ext[i0]) / (ext[i0 + 1] - ext[i0])
        return i0, w, np.ones(tgt.shape, bool)
    i0 = np.searchsorted(src, tgt, side="right") - 1
    ok = (tgt >= src[0]) & (tgt <= src[-1])
    i0 = np.clip(i0, 0, max(n - 2, 0))
    if n == 1:
        return i0, np.zeros(tgt.shape), ok & (tgt == src[0])
    w = (tgt - src[i0]) / (src[i0 + 1] - src[i0])
    return i0, w, ok


def is_periodic_lon(lons: np.ndarray) -> bool:
    """True when a sorted longitude axis covers the globe (gap to wrap ~ one step)."""
    if lons.size < 3:
        return False
    d = np.diff(lons)
    step = float(np.median(d))
    # No hole inside and one step across the seam (a regional grid across the dateline
    # also touches both ends after wrapping, but has a hole in the middle).
    return bool(d.max() < 1.5 * step and abs((lons[0] + 360.0) - lons[-1] - step) < 0.5 * step)


def bilinear(field: np.ndarray, i0: np.ndarray, i1: np.ndarray, wy: np.ndarray, oky: np.ndarray,
             j0: np.ndarray, j1: np.ndarray, wx: np.ndarray, okx: np.ndarray) -> np.ndarray:
    """Bilinear interp of (..., ny, nx) `field` onto the outer product of target rows/cols.

    i0/i1 (j0/j1) are the lower/upper neighbour indices of each target row (column) in
    `field`, wy (wx) the weight of the upper one. A target takes NaN when it is out of range
    or any of its four neighbours is NaN (as xarray's linear interp does): interpolating across
    the coast would invent water.
    """
    f00 = field[..., i0[:, None], j0[None, :]]
    f01 = field[..., i0[:, None], j1[None, :]]
    f10 = field[..., i1[:, None], j0[None, :]]
    f11 = field[..., i1[:, None], j1[None, :]]
    wy_ = wy[:, None].astype(np.float32)
    wx_ = wx[None, :].astype(np.float32)
    top = f00 + (f01 - f00) * wx_
    bot = f10 + (f11 - f10) * wx_
    out = (top + (bot - top) * wy_).astype(np.float32)
    bad = ~(oky[:, None] & okx[None, :])
    if bad.any():
        out[..., bad] = np.nan
    return out
