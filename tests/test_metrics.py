"""Reconstruction metrics select the valid pixels: MSE, PSNR, SSIM and the per-depth profile."""

import pytest
import torch

from depthdif_hpc.metrics import per_depth_error, recon_metrics


def test_metrics_select_valid_pixels():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 16, 16, generator=g) * 10
    pred = target + 0.1
    mask = torch.ones_like(target, dtype=torch.bool)
    mask[0, 1, :4] = False
    target_nan = target.clone()
    target_nan[~mask] = float("nan")
    pred[0, 2, 0, 0] = float("nan")  # an invalid prediction pixel is skipped, not propagated
    mask[0, 2, 0, 0] = True
    m = recon_metrics(pred, target_nan, mask)
    assert m["recon_mse_full_recon"] == pytest.approx(0.01, rel=1e-4)
    assert m["recon_psnr_bands"] == 6
    # SSIM only on bands fully inside the mask and finite: 4 of 6 qualify... band (0,1) is
    # partially masked and band (0,2) holds a NaN prediction pixel that is still "selected".
    assert m["recon_ssim_bands"] >= 4 and 0.9 < m["recon_ssim_full_recon"] <= 1.0
    prof = per_depth_error(pred, target_nan, mask)
    assert prof["mae"] == pytest.approx([0.1, 0.1, 0.1], rel=1e-4) and (prof["count"] > 0).all()
