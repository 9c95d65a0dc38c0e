"""Baselines the model is evaluated against (docs/metrics.md#baselines), all in degC on (B, D, H, W) fields.

* `idw`: inverse-distance weighting of the observed profiles, per depth level.
* `surface_extended`: the satellite SST anomaly carried down through the water column,
  T(d, p) = C(d, p) + (SST(p) - C(0, p)), C the background (the per-pixel climatology).

The climatology itself is depthdif_hpc/inference/climatology.py and optimal interpolation
depthdif_hpc/inference/oi.py.
"""

from __future__ import annotations

import torch


def idw(values: torch.Tensor, observed: torch.Tensor, power: float = 2.0) -> torch.Tensor:
    """Interpolate observed columns to every pixel, separately per depth.

    values, observed: (B, D, H, W); distances are in pixels (the grid is regular at 0.1 degree).
    An observed pixel returns its own value; a depth with no observation in a sample is NaN.
    """
    b, d, h, w = values.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    grid = torch.stack((yy.flatten(), xx.flatten()), dim=1)  # (HW, 2)
    out = torch.full((b, d, h * w), float("nan"), dtype=torch.float64)
    for i in range(b):
        obs = observed[i].reshape(d, -1).bool()
        cols = obs.any(dim=0).nonzero().flatten()
        if cols.numel() == 0:
            continue
        dist = torch.cdist(grid, grid[cols])  # (HW, n)
        exact = dist == 0
        weight = torch.where(exact, torch.zeros_like(dist), dist.clamp_min(1e-12) ** -power)
        m = obs[:, cols].T.double()  # (n, D)
        v = values[i].reshape(d, -1)[:, cols].T.double() * m
        num = weight @ v  # (HW, D)
        den = weight @ m
        est = num / den
        # pixels that are themselves observed at a depth take that observation
        hit = exact.double() @ m  # (HW, D): 1 where this pixel is an observed column at that depth
        own = exact.double() @ v
        est = torch.where(hit > 0, own / hit.clamp_min(1), est)
        est = torch.where((den > 0) | (hit > 0), est, torch.full_like(est, float("nan")))
        out[i] = est.T
    return out.reshape(b, d, h, w).to(values.dtype)


def surface_extended(sst: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """sst (B, 1, H, W) degC, background (B, D, H, W) degC -> (B, D, H, W)."""
    if background.dim() != 4 or sst.shape[0] != background.shape[0] or sst.shape[2:] != background.shape[2:]:
        raise ValueError(f"sst {tuple(sst.shape)} and background {tuple(background.shape)} do not match")
    return background + (sst - background[:, :1])
