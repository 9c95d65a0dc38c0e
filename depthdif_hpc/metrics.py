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
    """Streaming per-depth error sums for one (method, support)."""

    depth: int
    n: np.ndarray = field(init=False)
    s: np.ndarray = field(init=False)
    sa: np.ndarray = field(init=False)
    s2: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.n, self.s, self.sa, self.s2 = (np.zeros(self.depth) for _ in range(4))

    def add(self, pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> None:
        """pred, truth (D, H, W) degC; mask (D, H, W) bool. Non-finite pairs are left out."""
        sel = mask & np.isfinite(pred) & np.isfinite(truth)
        err = np.where(sel, pred - truth, 0.0)
        self.n += sel.sum(axis=(1, 2))
        self.s += err.sum(axis=(1, 2))
        self.sa += np.abs(err).sum(axis=(1, 2))
        self.s2 += (err**2).sum(axis=(1, 2))

    def per_depth(self) -> dict[str, np.ndarray]:
        with np.errstate(invalid="ignore", divide="ignore"):
            n = np.where(self.n > 0, self.n, np.nan)
            return {"rmse": np.sqrt(self.s2 / n), "mae": self.sa / n, "bias": self.s / n, "count": self.n}

    def overall(self) -> dict[str, float]:
        n = self.n.sum()
        if n == 0:
            return {"rmse": math.nan, "mae": math.nan, "bias": math.nan, "count": 0}
        return {"rmse": float(np.sqrt(self.s2.sum() / n)), "mae": float(self.sa.sum() / n),
                "bias": float(self.s.sum() / n), "count": int(n)}


def per_depth_error(pred_c: torch.Tensor, target_c: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Per depth band of a (B, D, H, W) batch: RMSE, MAE, bias (degC) and the selected pixel count."""
    pred = pred_c.detach().float().cpu().numpy()
    target = target_c.detach().float().cpu().numpy()
    sel = mask.detach().cpu().numpy().astype(bool)
    stats = DepthStats(pred.shape[1])
    for b in range(pred.shape[0]):
        stats.add(pred[b], target[b], sel[b])
    return stats.per_depth()
