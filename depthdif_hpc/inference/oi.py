"""Optimal interpolation (simple kriging / Gaussian-process mean) of profile anomalies per depth
level, the classic mapping baseline (docs/metrics.md#optimal-interpolation).

Per level k, with background b (the per-pixel climatology, depthdif_hpc/inference/climatology.py),
observations y at n points and anomalies a = y - b there:

    mean(x) = b(x) + r(x)^T (R + e I)^-1 a
    var(x)  = s (1 - r(x)^T (R + e I)^-1 r(x))

R_ij = rho(d(x_i, x_j)), r_i(x) = rho(d(x, x_i)), s the signal variance and e the noise-to-signal
ratio (observation error variance e*s: sensor noise plus what the grid cannot represent).
Distances are great-circle (haversine, R = 6371 km). Correlation shapes, with d in km:

* `gaussian`:        rho = exp(-(d/L)^2)
* `roemmich_gilson`: rho = w exp(-(d/L)^2) + (1 - w) exp(-d/L_long), a short Gaussian plus a
  long exponential as in the Argo climatology of Roemmich and Gilson (2009), defaults L = 140 km
  from the fit grid, L_long = 1100 km, w = 0.77.

Everything is float64 and solved by Cholesky. The hyperparameters (L, e, s) of each level are
fitted on the train split by maximum marginal likelihood over a grid of (L, e), with s profiled
out in closed form (s_hat = sum a^T (R + e I)^-1 a / n); one eigendecomposition per (sample, L,
level) serves every e.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from scipy.linalg import cho_factor, cho_solve, eigh, solve_triangular

from depthdif_hpc.config import OIConfig

EARTH_RADIUS_KM = 6371.0


def haversine_km(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in km between points given in degrees (broadcasting)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(np.asarray(lon2) - np.asarray(lon1))
    h = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


def pairwise_km(lat_a: np.ndarray, lon_a: np.ndarray, lat_b: np.ndarray, lon_b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) great-circle distances."""
    return haversine_km(np.asarray(lat_a)[:, None], np.asarray(lon_a)[:, None],
                        np.asarray(lat_b)[None, :], np.asarray(lon_b)[None, :])


def correlation(d_km: np.ndarray, shape: str, length_km: float, long_km: float = 1100.0,
                short_weight: float = 0.77) -> np.ndarray:
    g = np.exp(-((d_km / length_km) ** 2))
    if shape == "gaussian":
        return g
    if shape == "roemmich_gilson":
        return short_weight * g + (1 - short_weight) * np.exp(-d_km / long_km)
    raise ValueError(f"unknown covariance shape {shape!r} (gaussian, roemmich_gilson)")


def solve(r_oo: np.ndarray, r_to: np.ndarray, anom: np.ndarray, signal_var: float,
          noise_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly mean (m,) and error variance (m,) at m targets from n observations.

    r_oo (n, n) and r_to (m, n) correlations, anom (n,) observed anomalies."""
    c = np.asarray(r_oo, np.float64) + noise_ratio * np.eye(len(anom))
    lower = cho_factor(c, lower=True)
    mean = np.asarray(r_to, np.float64) @ cho_solve(lower, np.asarray(anom, np.float64))
    v = solve_triangular(lower[0], np.asarray(r_to, np.float64).T, lower=True, check_finite=False)
    var = signal_var * np.clip(1.0 - np.einsum("nm,nm->m", v, v), 0.0, None)
    return mean, var


def pixel_latlon(rows: np.ndarray, cols: np.ndarray, res: float) -> tuple[np.ndarray, np.ndarray]:
    """Centres of global-grid pixels (row 0 = 90 N, col 0 = 180 W), degrees."""
    lat = 90.0 - (np.asarray(rows, np.float64) + 0.5) * res
    lon = -180.0 + (np.asarray(cols, np.float64) + 0.5) * res
    return lat, lon


@dataclass
class OIParams:
    """Hyperparameters per depth level (arrays of length D) and the shape they belong to."""

    shape: str
    length_km: np.ndarray
    noise_ratio: np.ndarray
    signal_var: np.ndarray
    long_km: float = 1100.0
    short_weight: float = 0.77
    fit: dict = field(default_factory=dict)  # what the fit saw (for the report)

    def corr(self, d_km: np.ndarray, length_km: float) -> np.ndarray:
        return correlation(d_km, self.shape, length_km, self.long_km, self.short_weight)

    def to_dict(self) -> dict:
        return {"covariance": self.shape, "length_km": self.length_km.tolist(),
                "noise_ratio": self.noise_ratio.tolist(), "signal_var": self.signal_var.tolist(),
                "rg_long_km": self.long_km, "rg_short_weight": self.short_weight, **self.fit}


def fit_hyperparameters(samples: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], cfg: OIConfig,
                        depth: int) -> OIParams:
    """Maximum marginal likelihood per level over cfg's (length, noise ratio) grid.

    samples: (lat (n,), lon (n,), anomalies (D, n) with NaN where a level is not observed), each
    an independent draw of the anomaly field (one day). With cfg.shared_across_levels one
    (length, noise ratio) maximises the likelihood summed over levels. The signal variance is
    profiled out: s_hat = Q / N with Q = sum over samples of a^T (R + e I)^-1 a and N the number
    of observations; -log likelihood = (N log s_hat + sum log det (R + e I) + N) / 2 + const.
    """
    lengths = np.asarray(cfg.length_grid_km, np.float64)
    noises = np.asarray(cfg.noise_ratio_grid, np.float64)
    q = np.zeros((depth, len(lengths), len(noises)))
    logdet = np.zeros_like(q)
    n_obs = np.zeros(depth)
    n_samples = 0
    for lat, lon, anom in samples:
        if anom.shape[0] != depth:
            raise ValueError(f"anomalies have {anom.shape[0]} levels, expected {depth}")
        d = pairwise_km(lat, lon, lat, lon)
        ok = np.isfinite(anom)
        n_samples += 1
        for il, length in enumerate(lengths):
            r = correlation(d, cfg.covariance, length, cfg.rg_long_km, cfg.rg_short_weight)
            eig: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # levels observed at the same points share it
            for k in range(depth):
                sel = ok[k]
                if not sel.any():
                    continue
                key = sel.tobytes()
                if key not in eig:
                    # scipy's default driver (syevr): numpy's divide-and-conquer one took 36 ms
                    # instead of 1 ms per 40 x 40 matrix on the shared 2-core VM (threaded BLAS)
                    lam, u = eigh(r[np.ix_(sel, sel)])
                    eig[key] = (np.clip(lam, 0.0, None), u)
                lam, u = eig[key]
                z2 = (u.T @ anom[k, sel]) ** 2
                q[k, il] += (z2[None, :] / (lam[None, :] + noises[:, None])).sum(axis=1)
                logdet[k, il] += np.log(lam[None, :] + noises[:, None]).sum(axis=1)
                if il == 0:
                    n_obs[k] += sel.sum()
    have = n_obs > 0
    if not have.any():
        raise ValueError("no observation to fit the OI hyperparameters on")
    with np.errstate(divide="ignore", invalid="ignore"):
        s_hat = q / n_obs[:, None, None]
        nll = 0.5 * (n_obs[:, None, None] * np.log(s_hat) + logdet + n_obs[:, None, None])
    length, noise, signal = np.empty(depth), np.empty(depth), np.empty(depth)
    shared = np.unravel_index(np.nanargmin(nll[have].sum(axis=0)), nll.shape[1:])
    for k in range(depth):
        src = k if have[k] else int(np.flatnonzero(have)[np.argmin(np.abs(np.flatnonzero(have) - k))])
        il, ie = shared if cfg.shared_across_levels else np.unravel_index(np.nanargmin(nll[src]), nll[src].shape)
        length[k], noise[k], signal[k] = lengths[il], noises[ie], s_hat[src, il, ie]
    fit = {"fit_samples": n_samples, "fit_observations_per_level": n_obs.tolist(),
           "length_grid_km": lengths.tolist(), "noise_ratio_grid": noises.tolist(),
           "levels_without_data": np.flatnonzero(~have).tolist(),
           "shared_across_levels": cfg.shared_across_levels,
           "method": "maximum marginal likelihood on the train split, signal variance profiled out"}
    return OIParams(cfg.covariance, length, noise, signal, cfg.rg_long_km, cfg.rg_short_weight, fit)


def analyse(params: OIParams, background: np.ndarray, tgt_lat: np.ndarray, tgt_lon: np.ndarray,
            obs_lat: np.ndarray, obs_lon: np.ndarray, anom: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OI at m targets: background (D, m) degC, observed anomalies (D, n) (NaN = level not observed).

    Returns mean (D, m) degC and error variance (D, m) degC^2; a level without observations keeps
    the background with the full signal variance."""
    depth, m = background.shape
    mean = background.astype(np.float64).copy()
    var = np.repeat(params.signal_var[:, None], m, axis=1).astype(np.float64)
    ok = np.isfinite(anom)
    if not ok.any():
        return mean, var
    d_oo = pairwise_km(obs_lat, obs_lon, obs_lat, obs_lon)
    d_to = pairwise_km(tgt_lat, tgt_lon, obs_lat, obs_lon)
    cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for k in range(depth):
        sel = ok[k]
        if not sel.any():
            continue
        length = float(params.length_km[k])
        if length not in cache:
            cache[length] = (params.corr(d_oo, length), params.corr(d_to, length))
        r_oo, r_to = cache[length]
        mu, v = solve(r_oo[np.ix_(sel, sel)], r_to[:, sel], anom[k, sel], float(params.signal_var[k]),
                      float(params.noise_ratio[k]))
        mean[k] += mu
        var[k] = v
    return mean, var
