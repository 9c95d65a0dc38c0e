"""Baselines the model is evaluated against (docs/metrics.md#baselines), all in degC on (B, D, H, W) fields.

* `idw`: inverse-distance weighting of the observed profiles, per depth level.
* `Climatology`: the training-set mean per depth and day of year (a circular window of days).
* `surface_extended`: the surface field carried down by the mean profile,
  T(d, p) = m(d) + (SST(p) - m(0)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from depthdif_hpc.model.embeddings import day_of_year


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


@dataclass
class Climatology:
    """Mean temperature per (day of year, depth) from training samples, degC."""

    table: torch.Tensor  # (365, D)

    @classmethod
    def fit(cls, temps: torch.Tensor, valid: torch.Tensor, dates: torch.Tensor,
            window_days: int = 15) -> Climatology:
        """temps/valid (N, D, H, W), dates (N,) YYYYMMDD."""
        v = valid.double()
        return cls.from_sums((temps.double() * v).sum(dim=(2, 3)), v.sum(dim=(2, 3)), dates, window_days)

    @classmethod
    def from_sums(cls, sums: torch.Tensor, counts: torch.Tensor, dates: torch.Tensor,
                  window_days: int = 15) -> Climatology:
        """Per-sample spatial sums and counts (N, D), so a large split can be streamed.

        Days with no sample within +-window fall back to the all-year mean of that depth.
        """
        sums, counts = sums.double(), counts.double()
        doy = day_of_year(dates) - 1
        days = torch.arange(365)
        circ = (days[:, None] - doy[None, :]).abs()
        near = (torch.minimum(circ, 365 - circ) <= window_days).double()  # (365, N)
        num, den = near @ sums, near @ counts
        overall = sums.sum(0) / counts.sum(0).clamp_min(1)
        table = torch.where(den > 0, num / den.clamp_min(1), overall.expand(365, -1))
        return cls(table.float())

    def predict(self, dates: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        rows = self.table[day_of_year(dates) - 1]  # (B, D)
        return rows[:, :, None, None].expand(shape).clone()

    def mean_profile(self) -> torch.Tensor:
        return self.table.mean(0)


def surface_extended(sst: torch.Tensor, mean_profile: torch.Tensor) -> torch.Tensor:
    """sst (B, 1, H, W) degC, mean_profile (D,) degC -> (B, D, H, W)."""
    return mean_profile.view(1, -1, 1, 1).to(sst.dtype) + (sst - mean_profile[0].to(sst.dtype))
