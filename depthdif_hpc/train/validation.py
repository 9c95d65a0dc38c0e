"""Validation: the stochastic loss on every rank, and a full reverse-diffusion reconstruction of
the cached first validation batch on global rank 0 with degC metrics and figures (SPEC 8.1)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from depthdif_hpc.data.profiles import GLORYS_DEPTHS
from depthdif_hpc.metrics import eval_mask, per_depth_error, recon_metrics
from depthdif_hpc.normalization import PLOT_MAX_C, PLOT_MIN_C, denormalize_temperature

log = logging.getLogger("depthdif_hpc.train")

LOSS_CKPT_NONFINITE = 1e9  # SPEC 7: val/loss_ckpt replaces NaN/inf by 1e9


def slice_batch(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """First n samples of a host batch (tensors and lists), cloned so the loader can reuse memory."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            out[k] = v[:n].clone()
        elif isinstance(v, list):
            out[k] = v[:n]
        else:
            out[k] = v
    return out


def reconstruct(model: torch.nn.Module, batch: dict[str, Any], *, ambient: bool, sampler: str,
                log_intermediates: bool, generator: torch.Generator | None) -> dict[str, Any]:
    """Run predict on a device batch and compute the SPEC 8.1 metrics in degC."""
    res = model.predict(batch, sampler=sampler, return_intermediates=log_intermediates, generator=generator)
    pred_c = res["y_hat_denorm"]
    target_norm = batch["x"] if ambient else batch["y"]
    mask = eval_mask(batch, ambient)
    target_c = denormalize_temperature(target_norm.float()).masked_fill(~mask, float("nan"))
    metrics = recon_metrics(pred_c, target_c, mask)
    # "Generated" pixels: not given to the model. Standard: Y and not A; ambient: A and Y and not A~;
    # a model without a condition (the autoencoder) says itself which pixels it produced.
    x_valid = batch["x_valid_mask"] > 0.5
    if res.get("generated_mask") is not None:
        generated = mask & res["generated_mask"]
    elif ambient and res.get("further_valid_mask") is not None:
        generated = mask & ~(res["further_valid_mask"] > 0.5)
    else:
        generated = mask & ~x_valid
    profile = per_depth_error(pred_c, target_c, generated)
    return {"metrics": metrics, "profile": profile, "pred_c": pred_c, "target_c": target_c,
            "result": res}


def _finite_or(x: float, default: float) -> float:
    return x if np.isfinite(x) else default


def figures(batch: dict[str, Any], rec: dict[str, Any], out_dir: Path, step: int, *,
            ambient: bool, log_intermediates: bool) -> dict[str, Any]:
    """Reconstruction grid, per-depth error profile (and intermediates) as PNGs; returns figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, Any] = {}
    n = min(5, batch["x"].shape[0])
    band = 0
    x_c = denormalize_temperature(batch["x"].float()).masked_fill(batch["x_valid_mask"] <= 0.5, float("nan"))
    y_c = denormalize_temperature(batch["y"].float()).masked_fill(batch["y_valid_mask"] <= 0.5, float("nan")) \
        if "y" in batch else None
    panels = [("x (obs)", x_c)]
    if y_c is not None:
        panels.append(("GLORYS y", y_c))
    if "eo" in batch:
        panels.append(("eo", denormalize_temperature(batch["eo"].float())))
    panels.append(("y_hat", rec["pred_c"]))
    if ambient:
        panels.append(("target", rec["target_c"]))
    if "land_mask" in batch:
        panels.append(("ocean mask", batch["land_mask"].float()))
    fig, axes = plt.subplots(n, len(panels), figsize=(2.2 * len(panels), 2.2 * n), squeeze=False)
    for i in range(n):
        for j, (title, t) in enumerate(panels):
            img = t[i, min(band, t.shape[1] - 1)].detach().float().cpu().numpy()
            is_mask = title == "ocean mask"
            axes[i, j].imshow(img, cmap="gray" if is_mask else "turbo",
                              vmin=0 if is_mask else PLOT_MIN_C, vmax=1 if is_mask else PLOT_MAX_C)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(title, fontsize=8)
    fig.suptitle(f"step {step}, depth band {band} (degC)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / f"step_{step:08d}_recon.png", dpi=80)
    figs["val/recon_grid"] = fig

    prof = rec["profile"]
    fig2, ax = plt.subplots(figsize=(4, 3.5))
    k = np.arange(len(prof["mae"]))
    ylabel = "depth index"
    if len(k) == len(GLORYS_DEPTHS):  # the 50 GLORYS levels: plot against depth in metres
        k, ylabel = GLORYS_DEPTHS, "depth (m)"
        ax.set_yscale("log")
    ax.plot(prof["mae"], k, marker=".", label="MAE")
    ax.plot(prof["rmse"], k, marker=".", label="RMSE")
    ax.invert_yaxis()
    ax.set_xlabel("error (degC), generated pixels")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.set_title(f"per-depth error, step {step}", fontsize=9)
    fig2.tight_layout()
    fig2.savefig(out_dir / f"step_{step:08d}_depth_error.png", dpi=80)
    figs["val/depth_error_profile"] = fig2

    res = rec["result"]
    if log_intermediates and res.get("x0_denoise_samples") is not None:
        frames = res["x0_denoise_samples"]
        frames = frames if isinstance(frames, torch.Tensor) else torch.stack(list(frames))
        # frames: (S, B, G, H, W) of x0 estimates along the reverse chain (normalised units)
        s = frames.shape[0]
        idx = np.linspace(0, s - 1, min(16, s)).round().astype(int)
        fig3, axes3 = plt.subplots(4, 4, figsize=(8, 8), squeeze=False)
        for a, i in zip(axes3.flat, list(idx) + [None] * (16 - len(idx)), strict=False):
            a.set_xticks([])
            a.set_yticks([])
            if i is None:
                continue
            img = denormalize_temperature(frames[i, 0, 0].float()).cpu().numpy()
            a.imshow(img, cmap="turbo", vmin=PLOT_MIN_C, vmax=PLOT_MAX_C)
            a.set_title(f"frame {i}", fontsize=7)
        fig3.tight_layout()
        fig3.savefig(out_dir / f"step_{step:08d}_intermediates.png", dpi=70)
        figs["val/denoise_intermediates"] = fig3
        mask = eval_mask(batch, ambient)
        tgt = rec["target_c"]
        maes = []
        for i in range(s):
            p = denormalize_temperature(frames[i].float().to(tgt.device))
            sel = mask & torch.isfinite(tgt)
            maes.append(float((p[sel] - tgt[sel]).abs().mean()) if sel.any() else float("nan"))
        fig4, ax4 = plt.subplots(figsize=(4, 3))
        ax4.plot(maes)
        ax4.set_xlabel("reverse step")
        ax4.set_ylabel("MAE of x0 estimate (degC)")
        fig4.tight_layout()
        fig4.savefig(out_dir / f"step_{step:08d}_mae_vs_step.png", dpi=80)
        figs["val/mae_vs_step"] = fig4
    return figs
