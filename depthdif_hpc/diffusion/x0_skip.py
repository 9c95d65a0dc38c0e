"""The Gaussian skip of the x0 estimate (docs/model.md#gaussian-x0-skip).

The network's output m is read as the mean of a Gaussian belief about x0, x0 ~ N(m, s^2) per
generated channel, and the x0 estimate is that belief's posterior mean given x_t =
sqrt(ab) x0 + sqrt(1 - ab) eps:

    x0_hat = m + k (x_t - sqrt(ab) m),    k = sqrt(ab) s^2 / (ab s^2 + 1 - ab).

For a given m this k is the least-squares coefficient of the residual x0 - m on x_t - sqrt(ab) m
(= sqrt(ab) (x0 - m) + sqrt(1 - ab) eps), so the unchanged x0 MSE is minimised at s^2 = the
residual variance of m: training learns s^2 from the loss. The estimate then follows x_t where the
noise is below s, and a sampler's members spread by about s around m, where a network that ignores
x_t makes them collapse onto m.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Adam moves a parameter by about lr per step whatever its gradient's size, and s^2 gets a
# gradient only from the few draws of t whose noise is below s (t < ~10 of 1000 for a deep level
# under the global z-score), so log s^2 is stored divided by this gain. Toy Gaussian, AdamW lr 2e-3
# (the demo's), batch 8: from INIT_VAR, residual variances 1e-4 ... 0.25 are reached within ~15 %
# in ~400 steps with gain 10; with gain 1 a start 100x too large shrinks only 2.2x in 600 steps.
LOG_VAR_GAIN = 10.0
# The start: s = 0.01 model units, below every residual the demo measures, so the skip starts
# nearly off (today's estimate) and grows; from above, the gradient is weaker and the approach slower.
INIT_VAR = 1e-4


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
        s2 = self.variance().view(1, -1, *([1] * (m.ndim - 2)))
        k = ab.sqrt() * s2 / (ab * s2 + (1 - ab))
        m = m.float()
        innovation = x_t.float() - ab.sqrt() * m
        if valid is not None:
            innovation = innovation * valid.to(innovation.dtype)
        return m + k * innovation
