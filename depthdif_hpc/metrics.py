"""Reconstruction metrics in degC over valid pixels (docs/metrics.md#reconstruction-metrics, with
the project's fix).

Pixels are *selected* (boolean indexing) instead of multiplying NaN-holding tensors by zero
masks, so an invalid pixel can never turn a band's metric into NaN. Shared by the trainer's
validation and the evaluation code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch


def eval_mask(batch: dict, ambient: bool) -> torch.Tensor:
    """Eval mask (docs/metrics.md#full-reconstruction): the loss support of
    docs/model.md#loss-supports without the land mask, (B, D, H, W) bool."""
    y_valid = batch["y_valid_mask"] > 0.5
    if ambient:
        return (batch["x_valid_mask"] > 0.5) & y_valid
    return y_valid


def recon_metrics(pred_c: torch.Tensor, target_c: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """MSE (degC^2), mean PSNR and mean SSIM over (sample, depth band) pairs.

    pred_c, target_c: (B, D, H, W) in degC (NaN allowed); mask: (B, D, H, W) bool.
    PSNR: per band with >= 1 selected pixel and a non-zero target range, 10 log10(range^2 / MSE).
    SSIM: scikit-image SSIM per band only when the whole band is selected; 0 when none qualifies.
    """
    pred = pred_c.detach().float().cpu().numpy()
    target = target_c.detach().float().cpu().numpy()
    sel_all = mask.detach().cpu().numpy().astype(bool) & np.isfinite(pred) & np.isfinite(target)
    diff = pred[sel_all] - target[sel_all]
    mse = float(np.mean(diff**2)) if diff.size else float("nan")
    psnrs, ssims = [], []
    b, d = pred.shape[:2]
    for i in range(b):
        for k in range(d):
            sel = sel_all[i, k]
            if not sel.any():
                continue
            t = target[i, k][sel]
            rng = float(t.max() - t.min())
            if rng <= 0:
                continue
            band_mse = float(np.mean((pred[i, k][sel] - t) ** 2))
            psnrs.append(math.inf if band_mse == 0 else 10.0 * math.log10(rng**2 / band_mse))
            if sel.all() and min(sel.shape) >= 7:
                ssims.append(_ssim(target[i, k], pred[i, k], rng))
    return {
        "recon_mse_full_recon": mse,
        "recon_psnr_full_recon": float(np.mean(psnrs)) if psnrs else float("nan"),
        "recon_ssim_full_recon": float(np.mean(ssims)) if ssims else 0.0,
        "recon_psnr_bands": float(len(psnrs)),
        "recon_ssim_bands": float(len(ssims)),
    }


def _ssim(target: np.ndarray, pred: np.ndarray, data_range: float) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(target, pred, data_range=data_range))


@dataclass
class DepthStats:
    """Streaming per-depth error sums for one (method, support), and the truth's own sums so the
    coefficient of determination R^2 = 1 - SSE / SST (SST about the pooled mean of the truth at
    that level) comes out of the same pass."""

    depth: int
    n: np.ndarray = field(init=False)
    s: np.ndarray = field(init=False)
    sa: np.ndarray = field(init=False)
    s2: np.ndarray = field(init=False)
    t: np.ndarray = field(init=False)
    t2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.n, self.s, self.sa, self.s2, self.t, self.t2 = (np.zeros(self.depth) for _ in range(6))

    def add(self, pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> None:
        """pred, truth (D, H, W) degC; mask (D, H, W) bool. Non-finite pairs are left out."""
        sel = mask & np.isfinite(pred) & np.isfinite(truth)
        err = np.where(sel, pred - truth, 0.0)
        tru = np.where(sel, truth, 0.0)
        self.n += sel.sum(axis=(1, 2))
        self.s += err.sum(axis=(1, 2))
        self.sa += np.abs(err).sum(axis=(1, 2))
        self.s2 += (err**2).sum(axis=(1, 2))
        self.t += tru.sum(axis=(1, 2))
        self.t2 += (tru**2).sum(axis=(1, 2))

    def per_depth(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            n = np.where(self.n > 0, self.n, np.nan)
            sst = self.t2 - self.t**2 / n
            r2 = np.where(sst > 0, 1.0 - self.s2 / sst, np.nan)
            return {"rmse": np.sqrt(self.s2 / n), "mae": self.sa / n, "bias": self.s / n, "r2": r2,
                    "count": self.n}

    def overall(self) -> dict[str, float]:
        """Pooled over all points of all depths. R^2 is 1 - sum SSE / sum SST with each level's
        SST about that level's own mean: pooling about one mean would credit reproducing the mean
        profile, and a mean of per-level values is dominated by the deep levels, whose variance
        is tiny."""
        n = self.n.sum()
        if n == 0:
            return {"rmse": math.nan, "mae": math.nan, "bias": math.nan, "r2": math.nan, "count": 0}
        with np.errstate(invalid="ignore", divide="ignore"):
            has = self.n > 0
            sst = (self.t2 - self.t**2 / np.where(has, self.n, 1.0))[has].sum()
        r2 = float(1.0 - self.s2[has].sum() / sst) if sst > 0 else math.nan
        return {"rmse": float(np.sqrt(self.s2.sum() / n)), "mae": float(self.sa.sum() / n),
                "bias": float(self.s.sum() / n), "r2": r2, "count": int(n)}


@dataclass
class DepthMean:
    """Streaming per-depth mean of a pointwise score (CRPS, variance)."""

    depth: int
    total: np.ndarray = field(init=False)
    n: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.total, self.n = np.zeros(self.depth), np.zeros(self.depth)

    def add(self, values: np.ndarray, level: np.ndarray) -> None:
        """values (n,) at depth indices level (n,)."""
        self.total += np.bincount(level, weights=values, minlength=self.depth)
        self.n += np.bincount(level, minlength=self.depth)

    def per_depth(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.total / np.where(self.n > 0, self.n, np.nan)

    def overall(self) -> float:
        return float(self.total.sum() / self.n.sum()) if self.n.sum() else math.nan


# --- probabilistic scores (docs/metrics.md#probabilistic-scores) -----------------------------
# CRPS comes from scoringrules (numpy backend): one maintained implementation of each estimator.


def crps_ensemble_fair(obs: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Fair (unbiased for the ensemble's distribution) CRPS; obs (n,), members (n, M), M >= 2."""
    import scoringrules as sr

    if members.ndim != 2 or members.shape[1] < 2 or members.shape[0] != obs.shape[0]:
        raise ValueError(f"members must be (n, M >= 2) for obs ({obs.shape[0]},), got {members.shape}")
    return np.asarray(sr.crps_ensemble(obs, members, m_axis=-1, estimator="fair", backend="numpy"))


def crps_gaussian(obs: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Closed-form CRPS of N(mu, sigma^2)."""
    import scoringrules as sr

    return np.asarray(sr.crps_normal(obs, mu, np.maximum(sigma, 1e-12), backend="numpy"))


def spread_skill(mean_var: float | np.ndarray, mse: float | np.ndarray,
                 members: int | None) -> float | np.ndarray:
    """sqrt(mean variance) / RMSE, times sqrt((M + 1) / M) for an M-member ensemble (the finite-
    ensemble correction; None for a distribution given in closed form). About 1 when calibrated."""
    factor = math.sqrt((members + 1) / members) if members else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return factor * np.sqrt(mean_var) / np.sqrt(mse)


def ensemble_ranks(obs: np.ndarray, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rank 0..M of each observation among its M members (ties broken at random, so a discrete
    or clamped ensemble does not pile up at one end); obs (n,), members (n, M)."""
    below = (members < obs[:, None]).sum(axis=1)
    ties = (members == obs[:, None]).sum(axis=1)
    return below + np.floor(rng.random(obs.shape[0]) * (ties + 1)).astype(np.int64)


def two_pixel_power(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per level of a (D, H, W) field (NaN read as 0, each level's mean removed): the power on the
    2-pixel period, i.e. the Nyquist row and column of the 2-D spectrum, and the total power, both
    (D,). An odd H or W drops its last row or column (it has no Nyquist frequency). Their ratio is
    the checkerboard's share (docs/metrics.md#checkerboard)."""
    f = np.nan_to_num(np.asarray(field, dtype=np.float64), nan=0.0)
    if f.ndim != 3 or f.shape[1] < 2 or f.shape[2] < 2:
        raise ValueError(f"need a (D, H >= 2, W >= 2) field, got {f.shape}")
    f = f[:, : f.shape[1] // 2 * 2, : f.shape[2] // 2 * 2]
    f = f - f.mean(axis=(1, 2), keepdims=True)
    p = np.abs(np.fft.fft2(f)) ** 2
    h2, w2 = f.shape[1] // 2, f.shape[2] // 2
    nyquist = p[:, h2, :].sum(axis=1) + p[:, :, w2].sum(axis=1) - p[:, h2, w2]
    return nyquist, p.sum(axis=(1, 2))


def per_depth_error(pred_c: torch.Tensor, target_c: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Per depth band of a (B, D, H, W) batch: RMSE, MAE, bias (degC) and the selected pixel count."""
    pred = pred_c.detach().float().cpu().numpy()
    target = target_c.detach().float().cpu().numpy()
    sel = mask.detach().cpu().numpy().astype(bool)
    stats = DepthStats(pred.shape[1])
    for b in range(pred.shape[0]):
        stats.add(pred[b], target[b], sel[b])
    return stats.per_depth()
