"""Vertical alignment of in-situ profiles onto the 50 GLORYS depths and rasterisation (docs/model.md#vertical-alignment)."""

from __future__ import annotations

import numpy as np

# The 50 GLORYS12 depth levels in metres (docs/model.md#depth-levels).
GLORYS_DEPTHS = np.array([
    0.494, 1.541, 2.646, 3.819, 5.078, 6.441, 7.93, 9.573, 11.405, 13.468,
    15.81, 18.495, 21.599, 25.211, 29.444, 34.434, 40.344, 47.373, 55.764, 65.808,
    77.853, 92.326, 109.729, 130.666, 155.851, 186.126, 222.475, 266.04, 318.127, 380.213,
    453.938, 541.089, 643.567, 763.333, 902.339, 1062.44, 1245.291, 1452.251, 1684.284, 1941.893,
    2225.078, 2533.336, 2865.703, 3220.82, 3597.032, 3992.484, 4405.224, 4833.291, 5274.784,
    5727.917,
])


def align_profile(depth: np.ndarray, temp: np.ndarray,
                  levels: np.ndarray = GLORYS_DEPTHS) -> np.ndarray:
    """One profile -> temperature at `levels` (NaN where not accepted); see
    docs/model.md#vertical-alignment.

    Finite pairs with depth >= 0 are sorted and duplicate depths averaged; each level inside
    [min, max] observed depth is linearly interpolated and accepted only if the nearest
    observation lies within max(0.1 z, 10 m). A single-sample profile fills only a level that
    matches its depth within 1e-6 m. No extrapolation.
    """
    depth = np.asarray(depth, dtype=np.float64).ravel()
    temp = np.asarray(temp, dtype=np.float64).ravel()
    keep = np.isfinite(depth) & np.isfinite(temp) & (depth >= 0)
    out = np.full(levels.shape, np.nan)
    if not keep.any():
        return out
    d, t = depth[keep], temp[keep]
    uniq, inv = np.unique(d, return_inverse=True)  # sorted
    if uniq.size < d.size:
        t = np.bincount(inv, weights=t) / np.bincount(inv)
    else:
        t = t[np.argsort(d, kind="stable")]
    d = uniq
    if d.size == 1:
        hit = np.abs(levels - d[0]) <= 1e-6
        out[hit] = t[0]
        return out
    inside = (levels >= d[0]) & (levels <= d[-1])
    z = levels[inside]
    vals = np.interp(z, d, t)
    pos = np.searchsorted(d, z)
    left = d[np.clip(pos - 1, 0, d.size - 1)]
    right = d[np.clip(pos, 0, d.size - 1)]
    nearest = np.minimum(np.abs(z - left), np.abs(right - z))
    ok = nearest <= np.maximum(0.1 * z, 10.0)
    res = np.full(z.shape, np.nan)
    res[ok] = vals[ok]
    out[inside] = res
    return out


def align_profiles(depth: np.ndarray, temp: np.ndarray,
                   levels: np.ndarray = GLORYS_DEPTHS) -> np.ndarray:
    """(P, L) depth/temp -> (P, 50) float32 aligned temperatures."""
    out = np.full((depth.shape[0], levels.size), np.nan, dtype=np.float32)
    for p in range(depth.shape[0]):
        out[p] = align_profile(depth[p], temp[p], levels)
    return out


def pixel_of(lat: np.ndarray, lon: np.ndarray, top: float, left: float, res: float,
             size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row/col of points in a patch: row = floor((top - lat)/res), col = floor((lon - left)/res).

    Half-open bounds (lat in (top - size*res, top], lon in [left, left + size*res)), the lon
    difference taken modulo 360 so patches across the dateline work. The 1e-9 guards against
    a point exactly on a pixel edge landing one pixel off through binary rounding.
    """
    row = np.floor((top - np.asarray(lat, np.float64)) / res + 1e-9).astype(np.int64)
    dlon = (np.asarray(lon, np.float64) - left) % 360.0
    col = np.floor(dlon / res + 1e-9).astype(np.int64)
    ok = (row >= 0) & (row < size) & (col >= 0) & (col < size)
    return row, col, ok


def rasterize(aligned: np.ndarray, rows: np.ndarray, cols: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Average aligned profiles that share a pixel, per level.

    Returns (pixels (K, 2) int64 [row, col], values (K, 50) float32 with NaN where no profile
    of that pixel has the level); pixels are sorted row-major and have at least one value.
    """
    if aligned.shape[0] == 0:
        return np.zeros((0, 2), np.int64), np.zeros((0, aligned.shape[1]), np.float32)
    key = rows * 100_000 + cols
    uniq, inv = np.unique(key, return_inverse=True)
    finite = np.isfinite(aligned)
    sums = np.zeros((uniq.size, aligned.shape[1]))
    counts = np.zeros((uniq.size, aligned.shape[1]))
    np.add.at(sums, inv, np.where(finite, aligned, 0.0))
    np.add.at(counts, inv, finite)
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan).astype(np.float32)
    has = counts.sum(1) > 0
    pix = np.stack([uniq // 100_000, uniq % 100_000], axis=1)
    return pix[has], vals[has]


PLATFORM_SLOTS = 4  # platform ids kept per observed pixel (store array obs_platform)
PLATFORM_NONE = -1  # empty slot
PLATFORM_MORE = -2  # the pixel holds more platforms than PLATFORM_SLOTS


def pixel_platforms(aligned: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                    platform: np.ndarray, slots: int = PLATFORM_SLOTS) -> np.ndarray:
    """(K, slots) int32 platform ids of the pixels `rasterize` returns for the same input, in its
    order: the distinct ids (ascending) of the profiles that gave the pixel a value, padded with
    PLATFORM_NONE; a pixel with more ids keeps slots - 1 of them and PLATFORM_MORE last.

    Profiles without any finite aligned value contribute no data, so not their id either.
    """
    has = np.isfinite(aligned).any(axis=1)
    key = rows * 100_000 + cols
    uniq = np.unique(key[has])
    out = np.full((uniq.size, slots), PLATFORM_NONE, np.int32)
    pairs = np.unique(np.stack([key[has], np.asarray(platform)[has]], axis=1), axis=0)
    start = np.searchsorted(pairs[:, 0], uniq, side="left")
    stop = np.searchsorted(pairs[:, 0], uniq, side="right")
    for k, (a, b) in enumerate(zip(start, stop, strict=True)):
        ids = pairs[a:b, 1]
        if ids.size > slots:
            ids = np.concatenate([ids[:slots - 1], [PLATFORM_MORE]])
        out[k, :ids.size] = ids
    return out
