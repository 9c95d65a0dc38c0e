"""Inference post-processing (docs/model.md#post-processing): depthwise Gaussian blur and NaN
masking."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from depthdif_hpc.diffusion.masks import align_mask


def gaussian_kernel1d(kernel_size: int, sigma: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, kernel_size, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return (pdf / pdf.sum()).to(dtype)


def gaussian_blur_depthwise(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Blur each channel of (B,C,H,W) with the same k x k Gaussian, reflect padding.

    Even k is bumped to odd; k <= 1 or sigma <= 0 returns x unchanged. Channels never mix.
    """
    if kernel_size <= 1 or sigma <= 0:
        return x
    if kernel_size % 2 == 0:
        kernel_size += 1
    c = x.shape[1]
    k1 = gaussian_kernel1d(kernel_size, sigma, x.dtype).to(x.device)
    pad = kernel_size // 2
    h = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    h = F.conv2d(h, k1.view(1, 1, 1, -1).expand(c, 1, 1, kernel_size), groups=c)
    return F.conv2d(h, k1.view(1, 1, -1, 1).expand(c, 1, kernel_size, 1), groups=c)


def mask_invalid(values: torch.Tensor, y_valid_mask: torch.Tensor) -> torch.Tensor:
    """Set pixels where y_valid_mask == 0 to NaN (mask aligned to the value channels)."""
    m = align_mask(y_valid_mask, values.shape[1], torch.bool)
    return values.masked_fill(~m, float("nan"))
