"""The Gaussian skip of the x0 estimate (docs/model.md#gaussian-x0-skip).

The network's output m is read as the mean of a Gaussian belief about x0, x0 ~ N(m, s^2) per
generated channel, and the x0 estimate is that belief's posterior mean given x_t =
sqrt(ab) x0 + sqrt(1 - ab) eps:

    x0_hat = m + k (x_t - sqrt(ab) m),    k = sqrt(ab) s^2 / (ab s^2 + 1 - ab).

s^2 is what a calibrated ensemble's spread must be: the variance of the error of the estimate made
before x_t says anything, i.e. of x0 - x0_hat where the noise swamps the signal. `nll` fits it by
the Gaussian likelihood of that residual on the training draws with ab_t < HIGH_NOISE_ALPHA_BAR
(its minimiser is the residual's mean square per channel); the x0 MSE does not move s^2 (it sees
s^2 detached), so the network learns the rest of E[x0 | x_t] around the skip. A sampler's
members then spread by about s around m, where a network that ignores x_t makes them collapse.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Adam moves a parameter by about lr per step whatever its gradient's size, so log s^2 is stored
# divided by this gain: up to 10 lr nats of s^2 per step, 0.02 at the demo's lr 2e-3.
LOG_VAR_GAIN = 10.0
# The start, in model units. The likelihood's gradient in log s^2, (1 - r^2/s^2)/2, is bounded
# from above but grows as r^2/s^2 from below, and Adam's second moment remembers those early large
# gradients: from below the approach ran at half speed. The demo's residual variances are ~1e-4 ...
# 1e-3 under the global z-score and ~4e-3 ... 1 per level. Toy Gaussian, AdamW lr 2e-3, batch 8
# (tests/diffusion/test_x0_skip.py): from 0.1, variances 4e-4 ... 1 are within 12 % after 400 steps;
# from 1e-2, 1.0 is still 5x too small after 400.
INIT_VAR = 0.1
# Draws of t whose x_t carries at most this much signal fit s^2: there the posterior variance
# s^2 (1 - ab) / (ab s^2 + 1 - ab) is >= 0.9 s^2 for every s^2 <= 1 (a model at least as good as
# the level's own spread), so the residual there is the error of an estimate made without x_t.
# About the last 20 % of the cosine schedule's steps.
HIGH_NOISE_ALPHA_BAR = 0.1


class GaussianX0Skip(nn.Module):
    """x0_hat = m + k_t (x_t - sqrt(ab_t) m) with a learned variance s^2 per generated channel."""

    def __init__(self, channels: int, init_var: float = INIT_VAR) -> None:
        super().__init__()
        if channels < 1 or not init_var > 0:
            raise ValueError(f"need channels >= 1 and init_var > 0, got {channels}, {init_var}")
        self.log_var_scaled = nn.Parameter(torch.full((channels,), math.log(init_var) / LOG_VAR_GAIN))

    def variance(self) -> torch.Tensor:
        """s^2 per channel, (C,), in model units squared."""
        return (self.log_var_scaled.float() * LOG_VAR_GAIN).exp()

    def forward(self, m: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """The x0 estimate (fp32) from the network output m (B, C, H, W), the state x_t it saw and
        alpha_bar_t per sample (B,). `valid`: where x_t carries the target (ambient mode's masked
        noisy branch is 0 elsewhere); outside it the estimate is m."""
        if m.shape != x_t.shape or m.shape[1] != self.log_var_scaled.numel():
            raise ValueError(f"x0 skip: output {tuple(m.shape)} and x_t {tuple(x_t.shape)} must match, "
                             f"with {self.log_var_scaled.numel()} channels")
        ab = alpha_bar.float().view(-1, *([1] * (m.ndim - 1)))
        # detached: s^2 answers only to `nll` (a proper score for it), not to the x0 MSE, whose
        # gradient on s^2 comes from the ~1 % of draws where the noise is below s and, once the
        # network uses x_t there, points at the wrong variance (docs/model.md#ensemble-spread).
        s2 = self.variance().detach().view(1, -1, *([1] * (m.ndim - 2)))
        k = ab.sqrt() * s2 / (ab * s2 + (1 - ab))
        m = m.float()
        innovation = x_t.float() - ab.sqrt() * m
        if valid is not None:
            innovation = innovation * valid.to(innovation.dtype)
        return m + k * innovation

    def nll(self, x0_hat: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
        """Gaussian negative log-likelihood of the residual x0 - x0_hat under N(0, s^2), per
        channel, over the rows whose alpha_bar_t < HIGH_NOISE_ALPHA_BAR and the pixels of `mask`
        (B or 1, C or 1, H, W); the mean over the channels that have any such pixel, 0 when none
        has. The residual is detached: the gradient reaches s^2 only."""
        if x0_hat.shape != x0.shape or x0.shape[1] != self.log_var_scaled.numel():
            raise ValueError(f"x0 skip: estimate {tuple(x0_hat.shape)} and target {tuple(x0.shape)} "
                             f"must match, with {self.log_var_scaled.numel()} channels")
        r2 = (x0.float() - x0_hat.detach().float()) ** 2
        rows = (alpha_bar.float() < HIGH_NOISE_ALPHA_BAR).to(r2.dtype).view(-1, *([1] * (r2.ndim - 1)))
        w = rows.expand_as(r2) if mask is None else rows * mask.to(r2.dtype).expand_as(r2)
        dims = [d for d in range(r2.ndim) if d != 1]
        count = w.sum(dim=dims)
        mean_r2 = (w * r2).sum(dim=dims) / count.clamp_min(1.0)
        log_var = self.log_var_scaled.float() * LOG_VAR_GAIN
        # Stays on the device (no host sync): channels without a pixel weigh 0.
        per_channel = 0.5 * (log_var + mean_r2 * torch.exp(-log_var))
        has = (count > 0).to(per_channel.dtype)
        return (per_channel * has).sum() / has.sum().clamp_min(1.0)
