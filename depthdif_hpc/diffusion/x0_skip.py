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

With `bins` > 1 (model.x0_skip: gaussian_spectral) the belief is a stationary Gaussian field,
x0 - m with an isotropic power spectrum P(|f|) per channel, piecewise constant over `bins` radial
bins of the spatial frequency, and the estimate is its Wiener filter, mode by mode of the 2-D DFT:

    x0_hat = m + IDFT[ sqrt(ab) P / (ab P + 1 - ab) * DFT(x_t - sqrt(ab) m) ].

One bin is the white case above (P = s^2). The likelihood is then Whittle's, of the residual's
periodogram per bin; members spread like the error does in space, not pixel by pixel.
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
# Radial bins of |f| from 0 to the grid's corner frequency sqrt(1/2) cycles per pixel: 16 give
# bins 0.044 cycles/px wide, ~3 DFT modes across on a 64 px tile, so the first bin is the
# mean and the largest scales and the error's ~5-10 px blobs of the demo fall in bins 2-4.
SPECTRAL_BINS = 16
MAX_FREQUENCY = math.sqrt(0.5)


def radial_bins(h: int, w: int, bins: int, device: torch.device | None = None) -> torch.Tensor:
    """The radial bin (0 .. bins-1) of every mode of an (h, w) 2-D DFT (torch.fft.fft2 order)."""
    fy = torch.fft.fftfreq(h, device=device)
    fx = torch.fft.fftfreq(w, device=device)
    f = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    return (f / MAX_FREQUENCY * bins).long().clamp_(max=bins - 1)


class GaussianX0Skip(nn.Module):
    """x0_hat = m + k_t (x_t - sqrt(ab_t) m) with a learned variance s^2 per generated channel,
    or with `bins` > 1 the Wiener filter of a learned isotropic error spectrum per channel."""

    def __init__(self, channels: int, bins: int = 1, init_var: float = INIT_VAR) -> None:
        super().__init__()
        if channels < 1 or bins < 1 or not init_var > 0:
            raise ValueError(f"need channels >= 1, bins >= 1 and init_var > 0, got {channels}, {bins}, {init_var}")
        self.channels, self.bins = channels, bins
        # A flat spectrum of height init_var is white noise of variance init_var per pixel.
        shape = (channels,) if bins == 1 else (channels, bins)
        self.log_var_scaled = nn.Parameter(torch.full(shape, math.log(init_var) / LOG_VAR_GAIN))

    def log_power(self) -> torch.Tensor:
        """log P per channel and radial bin, (C, bins), model units squared (white: log s^2)."""
        return self.log_var_scaled.float().view(self.channels, self.bins) * LOG_VAR_GAIN

    def power(self, h: int, w: int) -> torch.Tensor:
        """P at every mode of an (h, w) DFT, (C, h, w)."""
        return self.log_power().exp()[:, radial_bins(h, w, self.bins, self.log_var_scaled.device)]

    def variance(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The variance per pixel, (C,): s^2, or for a spectrum the mean of P over the modes of an
        (h, w) = `size` grid (Parseval)."""
        if self.bins == 1:
            return self.log_power()[:, 0].exp()
        if size is None:
            raise ValueError("a spectral x0 skip's variance per pixel depends on the grid: pass size=(h, w)")
        return self.power(*size).mean(dim=(1, 2))

    def _check(self, a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != self.channels:
            raise ValueError(f"x0 skip: {what} {tuple(a.shape)} and {tuple(b.shape)} must match, (B, C, H, W) "
                             f"with {self.channels} channels")

    def forward(self, m: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                valid: torch.Tensor | None = None) -> torch.Tensor:
        """The x0 estimate (fp32) from the network output m (B, C, H, W), the state x_t it saw and
        alpha_bar_t per sample (B,). `valid`: where x_t carries the target (ambient mode's masked
        noisy branch is 0 elsewhere); there the innovation is 0."""
        self._check(m, x_t, "output and x_t")
        ab = alpha_bar.float().view(-1, 1, 1, 1)
        m = m.float()
        innovation = x_t.float() - ab.sqrt() * m
        if valid is not None:
            innovation = innovation * valid.to(innovation.dtype)
        # detached: P answers only to `nll` (a proper score for it), not to the x0 MSE, whose
        # gradient comes from the ~1 % of draws where the noise is below s and, once the network
        # uses x_t there, points at the wrong variance (docs/model.md#ensemble-spread).
        if self.bins == 1:
            s2 = self.variance().detach().view(1, -1, 1, 1)
            return m + ab.sqrt() * s2 / (ab * s2 + (1 - ab)) * innovation
        p = self.power(*m.shape[-2:]).detach().unsqueeze(0)
        gain = ab.sqrt() * p / (ab * p + (1 - ab))
        return m + torch.fft.ifft2(gain * torch.fft.fft2(innovation)).real

    def nll(self, x0_hat: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor,
            mask: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood of the residual x0 - x0_hat under the belief, over the rows whose
        alpha_bar_t < HIGH_NOISE_ALPHA_BAR: per (row, channel) with any pixel in `mask` (B or 1,
        C or 1, H, W), Whittle's 1/2 sum_b n_b (log P_b + I_b / P_b) / sum_b n_b with I_b the mean
        periodogram |DFT r|^2 / (H W) of the zero-filled residual over bin b's n_b modes, divided by
        the row's valid fraction (one bin: the masked mean of r^2, exactly); the mean over those
        (row, channel) pairs, 0 when there is none. The residual is detached: the gradient reaches
        the spectrum only."""
        self._check(x0_hat, x0, "estimate and target")
        b, c, h, w = x0.shape
        r = x0.float() - x0_hat.detach().float()
        valid = torch.ones_like(r) if mask is None else mask.to(r.dtype).expand_as(r)
        r = r * valid
        frac = valid.mean(dim=(2, 3))
        use = (alpha_bar.float() < HIGH_NOISE_ALPHA_BAR).view(-1, 1) & (frac > 0)
        if self.bins == 1:
            periodogram = (r ** 2).mean(dim=(2, 3)).unsqueeze(-1)
            n_b = torch.ones(1, device=r.device)
        else:
            idx = radial_bins(h, w, self.bins, r.device).flatten()
            spec = (torch.fft.fft2(r).abs() ** 2).flatten(2) / (h * w)
            n_b = torch.bincount(idx, minlength=self.bins).to(r.dtype)
            periodogram = spec.new_zeros(b, c, self.bins).index_add_(2, idx, spec) / n_b.clamp_min(1.0)
        periodogram = periodogram / frac.clamp_min(1e-12).unsqueeze(-1)
        log_p = self.log_power()
        per_bin = 0.5 * (log_p + periodogram * torch.exp(-log_p))  # (B, C, bins)
        per_pair = (per_bin * (n_b / n_b.sum())).sum(dim=-1)
        # Stays on the device (no host sync).
        u = use.to(per_pair.dtype)
        return (per_pair * u).sum() / u.sum().clamp_min(1.0)
