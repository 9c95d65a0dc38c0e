"""Tiles over a region of the global 0.1 degree grid, their results on disk, and the blend.

A `Domain` is a block of the global grid (row 0 = 90 N, col 0 = 180 W), periodic in longitude
when it spans the globe. `plan_tiles` lays tiles of `size` pixels at `stride` over it (the last
start always included, as the store's patch grid; around the globe the last tile wraps past
180 E). Each tile's result is one file written atomically (`TileResults`): its existence is
the record that the tile is done, so a killed run resumes per tile and ranks never share a
file. `blend_rows` reads the tiles that touch a band of rows and averages them with the
window of `window_1d` (docs/reconstruct.md#blending), so the whole field is never in memory.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from depthdif_hpc.data.grid import Tile, tile_starts


@dataclass(frozen=True)
class Domain:
    """Rows row0..row0+nrows-1 and columns col0..col0+ncols-1 (mod the globe) of the grid."""

    row0: int
    col0: int
    nrows: int
    ncols: int
    res: float
    periodic: bool = False

    @property
    def global_cols(self) -> int:
        return round(360 / self.res)

    def lats(self) -> np.ndarray:
        """Pixel-centre latitudes of the rows, north to south."""
        return 90.0 - (self.row0 + np.arange(self.nrows) + 0.5) * self.res

    def lons(self) -> np.ndarray:
        """Pixel-centre longitudes of the columns, ascending and continuous (a region across
        the dateline runs past 180)."""
        return -180.0 + (self.col0 + np.arange(self.ncols) + 0.5) * self.res


def global_domain(res: float) -> Domain:
    return Domain(0, 0, round(180 / res), round(360 / res), res, periodic=True)


def region_domain(region: tuple[float, float, float, float], res: float, size: int) -> Domain:
    """The pixels whose centres lie in `region` (lon0, lon1, lat0, lat1; lon1 < lon0 crosses
    the dateline), grown symmetrically to at least one tile."""
    lon0, lon1, lat0, lat1 = (float(v) for v in region)
    if not -90.0 <= lat0 < lat1 <= 90.0:
        raise ValueError(f"region latitudes {lat0}..{lat1} must satisfy -90 <= lat0 < lat1 <= 90")
    width = (lon1 - lon0) % 360.0
    if width == 0.0:
        raise ValueError(f"region longitudes {lon0}..{lon1} span nothing or the globe (use --global)")
    nglob_r, nglob_c = round(180 / res), round(360 / res)
    west = (lon0 + 180.0) % 360.0
    c0 = math.floor(west / res + 1e-9)
    c1 = math.ceil((west + width) / res - 1e-9)
    r0 = math.floor((90.0 - lat1) / res + 1e-9)
    r1 = math.ceil((90.0 - lat0) / res - 1e-9)
    if c1 - c0 >= nglob_c:
        return global_domain(res)
    if c1 - c0 < size:
        c0 -= (size - (c1 - c0)) // 2
        c1 = c0 + size
    if r1 - r0 < size:
        r0 -= (size - (r1 - r0)) // 2
        r0 = min(max(r0, 0), nglob_r - size)
        r1 = r0 + size
    return Domain(r0, c0 % nglob_c, r1 - r0, c1 - c0, res, periodic=False)


@dataclass(frozen=True)
class Placement:
    """One tile of a plan: its top-left pixel in domain rows/columns (columns of a periodic
    domain may run past ncols and wrap)."""

    index: int
    r: int
    c: int

    def tile(self, dom: Domain, size: int) -> Tile:
        """The tile on the global grid (tile_id = plan index)."""
        return Tile(self.index, dom.row0 + self.r, (dom.col0 + self.c) % dom.global_cols, size, dom.res)


def plan_tiles(dom: Domain, size: int, stride: int) -> list[Placement]:
    """Tiles covering the domain, row-major; around the globe the starts are every `stride`
    columns and the last tile wraps across 180 E."""
    if not 0 < stride <= size:
        raise ValueError(f"stride {stride} must be in 1..tile size {size}")
    if dom.nrows < size or dom.ncols < size:
        raise ValueError(f"domain {dom.nrows} x {dom.ncols} px is smaller than one {size} px tile")
    rows = tile_starts(dom.nrows, size, stride)
    cols = list(range(0, dom.ncols, stride)) if dom.periodic else tile_starts(dom.ncols, size, stride)
    return [Placement(i * len(cols) + j, r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)]


def window_1d(size: int) -> np.ndarray:
    """w(i) = sin^2(pi (i + 1/2) / size): smooth, largest at the tile centre and never zero at a
    pixel centre (min sin^2(pi / (2 size)), 1.5e-4 at 128 px), so every covered pixel has
    weight and a tile's edge, where a model sees least context, counts least."""
    return (np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2).astype(np.float64)


def window_2d(size: int) -> np.ndarray:
    w = window_1d(size)
    return np.outer(w, w)


# ------------------------------------------------------------------------------------------
# Tile results on disk
# ------------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TileResults:
    """One `.npz` per finished tile (or `.empty` for a tile without ocean) under `root`.

    Written to a temporary in the same folder, fsynced, renamed, the folder fsynced: a file
    with the final name is complete and durable, a killed write leaves only a temporary.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int, suffix: str) -> Path:
        return self.root / f"tile_{index:07d}{suffix}"

    def status(self, index: int) -> str | None:
        """'done', 'empty' or None (still to do)."""
        if self._path(index, ".npz").is_file():
            return "done"
        if self._path(index, ".empty").is_file():
            return "empty"
        return None

    def _publish(self, final: Path, write) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{final.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.root)

    def write(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        self._publish(self._path(index, ".npz"), lambda f: np.savez(f, **arrays))

    def write_empty(self, index: int) -> None:
        self._publish(self._path(index, ".empty"), lambda f: f.write(b""))

    def keys(self, index: int) -> list[str]:
        with np.load(self._path(index, ".npz")) as z:
            return list(z.files)

    def read(self, index: int, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
        """The tile's arrays (only `keys` when given: an npz member is read only when asked)."""
        with np.load(self._path(index, ".npz")) as z:
            return {k: z[k] for k in (z.files if keys is None else keys)}


def blend_rows(results: TileResults, plan: Iterable[Placement], dom: Domain, size: int,
               r0: int, r1: int, fields: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Blend domain rows r0:r1 of the tiles' arrays: `fields` maps each name to its leading
    shape (the array in a tile file is (*lead, size, size); the first name's validity, a
    (D,) lead, decides which values count).

    Each value is sum(w v) / sum(w) over the tiles covering it with a finite value, w the
    tile's `window_2d`; NaN where none does. Accumulated in float64; returns float32 arrays
    (*lead, r1 - r0, ncols) and "weight" (D, r1 - r0, ncols), the sum of weights.
    """
    names = list(fields)
    n = r1 - r0
    acc = {k: np.zeros((*fields[k], n, dom.ncols)) for k in names}
    wsum = np.zeros((*fields[names[0]], n, dom.ncols))
    w2 = window_2d(size)
    for p in plan:
        a, b = max(r0, p.r), min(r1, p.r + size)
        if a >= b or results.status(p.index) != "done":
            continue
        arrays = results.read(p.index, names)
        cols = (p.c + np.arange(size)) % dom.ncols
        rows = slice(a - p.r, b - p.r)
        w = w2[rows] * np.isfinite(arrays[names[0]][..., rows, :])
        wsum[..., a - r0:b - r0, cols] += w
        for k in names:
            v = arrays[k][..., rows, :]
            acc[k][..., a - r0:b - r0, cols] += np.where(np.isfinite(v), v, 0.0) * w
    out = {}
    has = wsum > 0
    safe = np.where(has, wsum, 1.0)
    for k in names:
        out[k] = np.where(has, acc[k] / safe, np.nan).astype(np.float32)
    out["weight"] = wsum.astype(np.float32)
    return out
