"""Reconstruction metrics in degC over valid pixels (SPEC 8.1, with the project's fix).

Pixels are *selected* (boolean indexing) instead of multiplying NaN-holding tensors by zero
masks, so an invalid pixel can never turn a band's metric into NaN. Shared by the trainer's
validation and the evaluation code.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def eval_mask(batch: dict, ambient: bool) -> torch.Tensor:
    """SPEC 8.1 eval mask: the task mask of SPEC 7 without the land mask, (B, D, H, W) bool."""
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


def per_depth_error(pred_c: torch.Tensor, target_c: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """Per depth band: MAE and RMSE in degC and the pixel count over the selected pixels."""
    pred = pred_c.detach().float().cpu().numpy()
    target = target_c.detach().float().cpu().numpy()
    sel_all = mask.detach().cpu().numpy().astype(bool) & np.isfinite(pred) & np.isfinite(target)
    d = pred.shape[1]
    mae, rmse, count = np.full(d, np.nan), np.full(d, np.nan), np.zeros(d, dtype=np.int64)
    for k in range(d):
        sel = sel_all[:, k]
        n = int(sel.sum())
        count[k] = n
        if n:
            e = pred[:, k][sel] - target[:, k][sel]
            mae[k] = float(np.abs(e).mean())
            rmse[k] = float(np.sqrt((e**2).mean()))
    return {"mae": mae, "rmse": rmse, "count": count}
