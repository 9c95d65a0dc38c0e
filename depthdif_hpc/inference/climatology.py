"""Per-pixel seasonal climatology of the GLORYS-like targets (docs/metrics.md#climatology).

For every pixel of the global 0.1 degree grid that a train sample covers, and every depth
level, a least-squares fit of the mean plus `harmonics` harmonics of the annual cycle,

    T(t) = c_0 + sum_k [c_2k-1 cos(2 pi k t / 365) + c_2k sin(2 pi k t / 365)],  t = day of year - 1,

with a ridge penalty `ridge * n` on the harmonic coefficients (not on the mean), so a split that
covers only part of the year still gives a bounded curve instead of an ill-conditioned one.
Harmonics smooth in time by construction (two harmonics resolve features of about three months);
they need 1 + 2H sums per pixel and level, where a day-of-year kernel smoother would need one per
day bin.

The fit is streamed: per train sample only the normal-equation sums A^T A and A^T y of the pixels
it covers are added, in blocks of `block_px` x `block_px` global pixels allocated on first touch,
so memory follows the area the split covers, not its number of samples. Samples are keyed by the
global grid indices the store records (`row0`, `col0`), so overlapping and neighbouring patches
share one estimate. A^T A is kept per pixel (GLORYS validity is static: land and sea floor); a
level whose validity changes over time at a pixel falls back to its time mean there. Pixels the
train split never covers (or never saw valid) use the domain-wide fit of that level.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from depthdif_hpc.config import ClimatologyConfig
from depthdif_hpc.data.store import META, ShardReader, quantizer_from, read_manifest

FORMAT = "depthdif-climatology/1"
_KEY = 1 << 20  # block key = block_row * _KEY + block_col (the global grid has 3600 columns)


def day_of_year(dates: np.ndarray) -> np.ndarray:
    """YYYYMMDD -> non-leap day of year 1..365 (Feb 29 counts as Feb 28, as the store's dates)."""
    dates = np.asarray(dates, dtype=np.int64)
    month, day = (dates // 100) % 100, dates % 100
    if np.any((month < 1) | (month > 12) | (day < 1) | (day > 31)):
        raise ValueError(f"not YYYYMMDD dates: {dates[(month < 1) | (month > 12)][:3]}")
    start = np.cumsum([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30])
    return start[month - 1] + np.minimum(day, np.where(month == 2, 28, 31))


def harmonic_basis(doy: np.ndarray, harmonics: int) -> np.ndarray:
    """(n,) day of year 1..365 -> (n, 1 + 2H) [1, cos, sin, cos 2, sin 2, ...]."""
    t = 2 * np.pi * (np.asarray(doy, dtype=np.float64) - 1) / 365.0
    cols = [np.ones_like(t)]
    for k in range(1, harmonics + 1):
        cols += [np.cos(k * t), np.sin(k * t)]
    return np.stack(cols, axis=-1)


def _ridge_solve(ata: np.ndarray, aty: np.ndarray, n: np.ndarray, ridge: float) -> np.ndarray:
    """ata (..., P, P), aty (..., P, D), n (...) -> coefficients (..., P, D)."""
    p = ata.shape[-1]
    pen = np.eye(p)
    pen[0, 0] = 0.0
    lhs = ata + ridge * np.maximum(n, 1.0)[..., None, None] * pen
    # an unseen pixel has ata = 0: keep it solvable, its coefficients are replaced by the caller
    lhs = lhs + (n <= 0)[..., None, None] * np.eye(p)
    return np.linalg.solve(lhs, aty)


@dataclass
class ClimatologyAccumulator:
    """Streaming normal-equation sums; `add` one sample at a time, then `finish`."""

    depth: int
    harmonics: int = 2
    ridge: float = 0.01
    block: int = 16
    blocks: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    n_samples: int = 0

    def __post_init__(self) -> None:
        p = 1 + 2 * self.harmonics
        self._p = p
        self.dom_ata = np.zeros((self.depth, p, p))
        self.dom_aty = np.zeros((self.depth, p))
        self.dom_n = np.zeros(self.depth)

    def _block(self, key: int) -> dict[str, np.ndarray]:
        b = self.blocks.get(key)
        if b is None:
            p, d, s = self._p, self.depth, self.block
            b = {"ata": np.zeros((p, p, s, s)), "n0": np.zeros((s, s)),
                 "aty": np.zeros((p, d, s, s)), "n": np.zeros((d, s, s))}
            self.blocks[key] = b
        return b

    def add(self, temp_c: np.ndarray, row0: int, col0: int, date: int) -> None:
        """One sample: temp_c (D, H, W) degC with NaN where invalid, origin on the global grid."""
        d, h, w = temp_c.shape
        if d != self.depth:
            raise ValueError(f"sample has {d} levels, the climatology {self.depth}")
        a = harmonic_basis(day_of_year(np.array([date])), self.harmonics)[0]
        aa = np.outer(a, a)
        valid = np.isfinite(temp_c)
        vals = np.where(valid, temp_c, 0.0)
        v0 = valid.any(axis=0)
        cnt = valid.sum(axis=(1, 2)).astype(np.float64)
        self.dom_ata += cnt[:, None, None] * aa
        self.dom_aty += vals.sum(axis=(1, 2))[:, None] * a
        self.dom_n += cnt
        s = self.block
        for br in range(row0 // s, (row0 + h - 1) // s + 1):
            r_lo, r_hi = max(br * s, row0), min((br + 1) * s, row0 + h)
            for bc in range(col0 // s, (col0 + w - 1) // s + 1):
                c_lo, c_hi = max(bc * s, col0), min((bc + 1) * s, col0 + w)
                blk = self._block(br * _KEY + bc)
                dst = (slice(r_lo - br * s, r_hi - br * s), slice(c_lo - bc * s, c_hi - bc * s))
                src = (slice(r_lo - row0, r_hi - row0), slice(c_lo - col0, c_hi - col0))
                m0 = v0[src]
                blk["n0"][dst] += m0
                blk["ata"][(..., *dst)] += aa[:, :, None, None] * m0
                blk["n"][(..., *dst)] += valid[(..., *src)]
                blk["aty"][(..., *dst)] += a[:, None, None, None] * vals[(..., *src)][None]
        self.n_samples += 1

    def finish(self, attrs: dict | None = None) -> Climatology:
        if not self.blocks:
            raise ValueError("the climatology saw no sample")
        keys = np.array(sorted(self.blocks), dtype=np.int64)
        p, d, s = self._p, self.depth, self.block
        coef = np.empty((len(keys), p, d, s, s), np.float32)
        seen = np.empty((len(keys), d, s, s), bool)
        dom = _ridge_solve(self.dom_ata, self.dom_aty[..., None], self.dom_n, self.ridge)[..., 0]  # (D, P)
        dom = np.where(self.dom_n[:, None] > 0, dom, np.nan)
        for j, k in enumerate(keys):
            b = self.blocks[int(k)]
            ata = np.moveaxis(b["ata"], (0, 1), (-2, -1))  # (s, s, P, P)
            aty = np.moveaxis(b["aty"], (0, 1), (-2, -1))  # (s, s, P, D)
            c = _ridge_solve(ata, aty, b["n0"], self.ridge)  # (s, s, P, D)
            c = np.moveaxis(c, (-2, -1), (0, 1))  # (P, D, s, s)
            n, n0 = b["n"], b["n0"][None]
            # validity changing over time at this pixel and level: the time mean only
            partial = (n > 0) & (n < n0)
            mean = b["aty"][0] / np.maximum(n, 1)
            c[0] = np.where(partial, mean, c[0])
            c[1:] = np.where(partial[None], 0.0, c[1:])
            coef[j] = c
            seen[j] = n > 0
        return Climatology(keys=keys, coef=coef, seen=seen, domain=dom.T.astype(np.float32),
                           harmonics=self.harmonics, block=s,
                           attrs={"format": FORMAT, "harmonics": self.harmonics, "ridge": self.ridge,
                                  "block_px": s, "n_samples": self.n_samples, **(attrs or {})})


@dataclass
class Climatology:
    """Fitted coefficients per block of the global grid; see the module docstring."""

    keys: np.ndarray  # (nb,) block keys, sorted
    coef: np.ndarray  # (nb, P, D, s, s)
    seen: np.ndarray  # (nb, D, s, s) the pixel and level had train data
    domain: np.ndarray  # (P, D) domain-wide fit per level (NaN where a level was never valid)
    harmonics: int
    block: int
    attrs: dict

    @property
    def depth(self) -> int:
        return self.domain.shape[1]

    def coefficients(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global pixel indices (n,) -> coefficients (n, P, D) and whether each is the pixel's own
        fit (n, D) (False: the domain-wide fallback)."""
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        s = self.block
        key = (rows // s) * _KEY + cols // s
        j = np.clip(np.searchsorted(self.keys, key), 0, len(self.keys) - 1)
        have = self.keys[j] == key
        ri, ci = rows % s, cols % s
        c = self.coef[j, :, :, ri, ci].astype(np.float64)  # (n, P, D)
        own = self.seen[j, :, ri, ci] & have[:, None]  # (n, D)
        return np.where(own[:, None, :], c, self.domain[None].astype(np.float64)), own

    def at(self, rows: np.ndarray, cols: np.ndarray, date: int) -> np.ndarray:
        """Climatology at global pixels (n,) on a YYYYMMDD date -> (D, n) degC."""
        c, _ = self.coefficients(rows, cols)
        a = harmonic_basis(day_of_year(np.array([date])), self.harmonics)[0]
        return np.einsum("p,npd->dn", a, c)

    def patch(self, row0: int, col0: int, h: int, w: int, date: int) -> np.ndarray:
        """(D, h, w) degC for the patch with origin (row0, col0) on the global grid."""
        rr, cc = np.meshgrid(np.arange(row0, row0 + h), np.arange(col0, col0 + w), indexing="ij")
        return self.at(rr.ravel(), cc.ravel(), date).reshape(self.depth, h, w)

    def own_fraction(self, row0: int, col0: int, h: int, w: int, valid: np.ndarray | None = None) -> float:
        """Share of the (pixel, level) pairs of a patch (those `valid` (D, h, w) marks, default all)
        that have their own fit, not the domain-wide fallback."""
        rr, cc = np.meshgrid(np.arange(row0, row0 + h), np.arange(col0, col0 + w), indexing="ij")
        own = self.coefficients(rr.ravel(), cc.ravel())[1].T.reshape(self.depth, h, w)
        sel = np.ones_like(own) if valid is None else valid
        return float(own[sel].mean()) if sel.any() else float("nan")

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically (temporary file, fsync, rename): a crash never leaves a file that loads."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, keys=self.keys, coef=self.coef, seen=self.seen, domain=self.domain,
                     attrs=np.array(json.dumps(self.attrs)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Climatology:
        try:
            with np.load(path, allow_pickle=False) as z:
                attrs = json.loads(str(z["attrs"]))
                if attrs.get("format") != FORMAT:
                    raise ValueError(f"format {attrs.get('format')!r}, expected {FORMAT!r}")
                return cls(keys=z["keys"], coef=z["coef"], seen=z["seen"], domain=z["domain"],
                           harmonics=int(attrs["harmonics"]), block=int(attrs["block_px"]), attrs=attrs)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
            raise ValueError(f"climatology file {path} cannot be read: {exc}") from exc


def store_identity(store: str | Path) -> str:
    """Hash of the store's manifest: a cached climatology is reused only for the same store."""
    return hashlib.sha256((Path(store) / "manifest.json").read_bytes()).hexdigest()[:16]


def iter_split_fields(store: str | Path, split: str) -> Iterator[tuple[int, np.ndarray, np.void]]:
    """(sample index, (1 + D, H, W) degC [eo, GLORYS-like y] with NaN where invalid, meta row),
    read shard by shard from the stored codes (independent of the model's normalization)."""
    import zarr

    store = Path(store)
    man = read_manifest(store)
    n = int(man["splits"][split]["n_samples"])
    per = int(man["shard_samples"])
    q = quantizer_from(man)
    try:
        fields = ShardReader(store / split / "fields").read
    except (OSError, ValueError, KeyError):
        arr = zarr.open_group(str(store), mode="r")[f"{split}/fields"]

        def fields(a: int, b: int) -> np.ndarray:
            return arr[a:b]
    meta = zarr.open_group(str(store), mode="r")[f"{split}/meta"]
    for a in range(0, n, per):
        b = min(a + per, n)
        codes, rows = fields(a, b), meta[a:b]
        for k in range(b - a):
            yield a + k, q.decode_c(codes[k]), rows[k]


class ObservationReader:
    """The observed profile columns of a split's samples in degC, on global grid indices.

    Samples are ordered by day (docs/data_store.md#layout), so the columns of one day are read
    once and kept until the day changes."""

    def __init__(self, store: str | Path, split: str) -> None:
        import zarr

        man = read_manifest(store)
        g = zarr.open_group(str(store), mode="r")[split]
        self.meta = g["meta"][:]
        self._obs = g["obs"]
        self.depth = len(man["levels_m"])
        self.tile = int(man["tile_size"])
        self.res = float(man["resolution_deg"])
        self._q = quantizer_from(man)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._day = None
        # samples by day once (a scan per sample would cost O(N^2) over a large split)
        days = self.meta[:, META["day"]]
        self._by_day = np.argsort(days, kind="stable")
        self._sorted_days = days[self._by_day]

    def origin(self, i: int) -> tuple[int, int]:
        return int(self.meta[i, META["row0"]]), int(self.meta[i, META["col0"]])

    def same_day(self, i: int) -> np.ndarray:
        """Indices of the samples on sample i's day (i included), ascending."""
        day = self.meta[i, META["day"]]
        a, b = np.searchsorted(self._sorted_days, day, "left"), np.searchsorted(self._sorted_days, day, "right")
        return np.sort(self._by_day[a:b])

    def columns(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global rows (n,), cols (n,) and values (D, n) degC (NaN: level not observed)."""
        day = int(self.meta[i, META["day"]])
        if day != self._day:
            self._cache, self._day = {}, day
        if i not in self._cache:
            k = int(self.meta[i, META["n_obs_pixels"]])
            o = self._obs[i][:k]
            r0, c0 = self.origin(i)
            self._cache[i] = (o[:, 0].astype(np.int64) + r0, o[:, 1].astype(np.int64) + c0,
                              self._q.decode_c(o[:, 2:2 + self.depth]).T.astype(np.float64))
        return self._cache[i]


def fit_store(store: str | Path, cfg: ClimatologyConfig, split: str = "train",
              progress: bool = False) -> Climatology:
    """Fit on one split of a store, streamed sample by sample."""
    from tqdm import tqdm

    man = read_manifest(store)
    if split not in man["splits"] or int(man["splits"][split]["n_samples"]) == 0:
        raise ValueError(f"store {store} has no {split} samples to fit the climatology")
    acc = ClimatologyAccumulator(len(man["levels_m"]), cfg.harmonics, cfg.ridge, cfg.block_px)
    bar = tqdm(total=int(man["splits"][split]["n_samples"]), desc="climatology", disable=not progress,
               leave=False)
    for _, temp, row in iter_split_fields(store, split):
        acc.add(temp[1:], int(row[META["row0"]]), int(row[META["col0"]]), int(row[META["date"]]))
        bar.update(1)
    bar.close()
    return acc.finish({"store": store_identity(store), "split": split})


def default_path(store: str | Path, cfg: ClimatologyConfig) -> Path:
    return Path(store) / "derived" / f"climatology_h{cfg.harmonics}_r{cfg.ridge:g}_b{cfg.block_px}.npz"


def load_or_fit(store: str | Path, cfg: ClimatologyConfig, path: str | Path | None = None,
                progress: bool = False) -> tuple[Climatology, Path | None]:
    """The cached climatology at `path` (default STORE/derived/...) if it was fitted on this
    store with these settings, else a new fit, saved there. Returns it and where it lives (None
    if the folder cannot be written: the fit is then used without a cache)."""
    path = Path(path) if path else default_path(store, cfg)
    ident = store_identity(store)
    if path.is_file():
        try:
            clim = Climatology.load(path)
            a = clim.attrs
            if (a.get("store") == ident and a.get("harmonics") == cfg.harmonics
                    and a.get("ridge") == cfg.ridge and a.get("block_px") == cfg.block_px):
                return clim, path
        except ValueError:
            pass  # damaged or foreign: refit and replace
    clim = fit_store(store, cfg, progress=progress)
    try:
        return clim, clim.save(path)
    except OSError:
        return clim, None
