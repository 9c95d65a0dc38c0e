"""Noise schedules (docs/model.md#noise-schedules) and the per-step quantities derived from them."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("linear", "quadratic", "sigmoid", "cosine")


def make_betas(schedule: str, num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """Betas as float64, shape (T,). Cosine ignores beta_start/beta_end but they are still checked."""
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    t = num_timesteps
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, t, dtype=torch.float64)
    if schedule == "quadratic":
        return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), t, dtype=torch.float64) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, t, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    if schedule == "cosine":
        s = 0.008
        u = torch.arange(t + 1, dtype=torch.float64)
        f = torch.cos(((u / t) + s) / (1 + s) * math.pi / 2) ** 2
        alphas_cumprod = f / f[0]
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return betas.clamp(1e-8, 0.999)
    raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")


def alpha_bars(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s), in the dtype of `betas`."""
    return torch.cumprod(1.0 - betas, dim=0)


class NoiseSchedule(nn.Module):
    """Buffers of the forward process: beta, alpha, alpha_bar and their square roots.

    Buffers are non-persistent: the config rebuilds them, so checkpoints hold weights only.
    """

    def __init__(self, schedule: str, num_timesteps: int, beta_start: float, beta_end: float) -> None:
        super().__init__()
        betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
        alphas = 1.0 - betas
        alphas_cumprod = alpha_bars(betas)
        self.num_timesteps = num_timesteps
        for name, value in {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": alphas_cumprod,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_alphas": alphas.sqrt(),
            "sqrt_recip_alphas": 1.0 / alphas.sqrt(),
        }.items():
            self.register_buffer(name, value.float(), persistent=False)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per-sample t of shape (B,)."""
        a = self.sqrt_alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1)))
        s = self.sqrt_one_minus_alphas_cumprod[t].view(-1, *([1] * (x0.ndim - 1)))
        return a * x0 + s * noise
