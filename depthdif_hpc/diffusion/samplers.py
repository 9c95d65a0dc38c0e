"""Reverse-process samplers (docs/model.md#samplers): DDPM (sigma^2 = beta) and DDIM with the tau
map.

A sampler owns the model-step schedule of the chain (`timesteps`, descending) and the update
rule; `reverse_diffusion` runs the shared loop with optional known-pixel clamping and
intermediates. All arithmetic is fp32 whatever the denoiser's precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from depthdif_hpc.diffusion import rng
from depthdif_hpc.diffusion.schedules import alpha_bars, make_betas


class DDPMSampler:
    """Ancestral DDPM with sigma_t = sqrt(beta_t); S = T steps; no clipping of x0."""

    name = "ddpm"

    def __init__(self, betas: torch.Tensor, parameterization: str) -> None:
        self.betas = betas.double()
        self.alphas = 1 - self.betas
        self.alphas_cumprod = alpha_bars(self.betas)
        self.parameterization = parameterization
        self.num_steps = len(betas)
        self.temperature = 1.0
        self.timesteps = torch.arange(self.num_steps - 1, -1, -1)  # model step per loop index, descending

    def model_step(self, i: int) -> int:
        return i

    def eps_and_x0(self, x: torch.Tensor, i: int, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.model_step(i)
        ab = float(self.alphas_cumprod[t])
        if self.parameterization == "x0":
            x0 = pred
            eps = (x - ab**0.5 * x0) / (1 - ab) ** 0.5
        else:
            eps = pred
            x0 = (x - (1 - ab) ** 0.5 * eps) / ab**0.5
        return eps, x0

    def step(self, x: torch.Tensor, i: int, pred: torch.Tensor,
             generator: rng.RowGenerators = None) -> torch.Tensor:
        eps, _ = self.eps_and_x0(x, i, pred)
        beta = float(self.betas[i])
        alpha = float(self.alphas[i])
        ab = float(self.alphas_cumprod[i])
        mean = (x - beta / (1 - ab) ** 0.5 * eps) / alpha**0.5
        if i == 0:
            return mean
        z = rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
        return mean + beta**0.5 * z


DDIM_DISCRETIZATIONS = ("uniform", "quadratic")


def ddim_timesteps(num_timesteps: int, num_steps: int, discretization: str = "uniform") -> torch.Tensor:
    """The S = min(num_steps, T) model steps tau_0 < ... < tau_{S-1} a DDIM chain visits.

    uniform: round(linspace(0, T-1, S)). quadratic: round(linspace(0, sqrt(T-1), S)^2), dense at the
    low-noise end, where a field whose spread is small in model units (a deep level under the
    global z-score: ~0.02) is resolved; duplicate rounded steps are moved up so the S steps stay
    distinct (docs/model.md#ensemble-spread).
    """
    if discretization not in DDIM_DISCRETIZATIONS:
        raise ValueError(f"unknown DDIM discretization {discretization!r}; expected one of "
                         f"{DDIM_DISCRETIZATIONS}")
    s = min(num_steps, num_timesteps)
    if discretization == "uniform" or s < 2:
        return torch.linspace(0, num_timesteps - 1, s, dtype=torch.float64).round().long()
    tau = (torch.linspace(0, (num_timesteps - 1) ** 0.5, s, dtype=torch.float64) ** 2).round().long()
    for i in range(1, s):  # a strictly increasing map (s <= T leaves room up to T-1)
        tau[i] = max(int(tau[i]), int(tau[i - 1]) + 1)
    return tau


class DDIMSampler(DDPMSampler):
    """DDIM over S = min(S_req, T) steps, tau_i = round(linspace(0, T-1, S)) (uniform) or dense
    near t = 0 (quadratic, `ddim_timesteps`).

    The U-Net receives tau_i (project decision; the reference passed the loop index i).
    """

    name = "ddim"

    def __init__(self, betas: torch.Tensor, parameterization: str, num_steps: int,
                 eta: float = 0.0, temperature: float = 1.0, clip_sample: bool = False,
                 discretization: str = "uniform") -> None:
        super().__init__(betas, parameterization)
        self.tau = ddim_timesteps(len(betas), num_steps, discretization)
        self.num_steps = len(self.tau)
        self.discretization = discretization
        self.timesteps = self.tau.flip(0)
        self.eta = eta
        self.temperature = temperature
        self.clip_sample = clip_sample

    def model_step(self, i: int) -> int:
        return int(self.tau[i])

    def step(self, x: torch.Tensor, i: int, pred: torch.Tensor,
             generator: rng.RowGenerators = None) -> torch.Tensor:
        eps, x0 = self.eps_and_x0(x, i, pred)
        ab = float(self.alphas_cumprod[self.tau[i]])
        ab_prev = float(self.alphas_cumprod[self.tau[i - 1]]) if i > 0 else 1.0
        if self.clip_sample:
            x0 = x0.clamp(-1, 1)
            eps = (x - ab**0.5 * x0) / (1 - ab) ** 0.5
        sigma = self.eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
        direction = max(0.0, 1 - ab_prev - sigma**2) ** 0.5
        out = ab_prev**0.5 * x0 + direction * eps
        if self.eta > 0:
            z = rng.randn(x.shape, generator, device=x.device, dtype=x.dtype)
            out = out + sigma * self.temperature * z
        return out


def make_sampler(name: str, *, schedule: str, num_timesteps: int, beta_start: float, beta_end: float,
                 parameterization: str, ddim_num_timesteps: int = 200, ddim_eta: float = 0.0,
                 ddim_temperature: float = 1.0, ddim_discretization: str = "uniform") -> DDPMSampler:
    betas = make_betas(schedule, num_timesteps, beta_start, beta_end)
    if name == "ddpm":
        return DDPMSampler(betas, parameterization)
    if name == "ddim":
        return DDIMSampler(betas, parameterization, ddim_num_timesteps, ddim_eta, ddim_temperature,
                           discretization=ddim_discretization)
    raise ValueError(f"unknown sampler {name!r}; expected 'ddpm' or 'ddim'")


@dataclass
class ReverseResult:
    sample: torch.Tensor
    denoise_samples: list[torch.Tensor] | None
    x0_denoise_samples: list[torch.Tensor] | None


class SamplingInterrupted(RuntimeError):
    """`should_stop` asked the reverse chain to stop (a preemption while sampling)."""


def reverse_diffusion(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler: DDPMSampler,
    shape: Sequence[int],
    *,
    device: torch.device,
    known: torch.Tensor | None = None,
    known_mask: torch.Tensor | None = None,
    return_intermediates: bool = False,
    intermediate_step_indices: Sequence[int] | None = None,
    generator: rng.RowGenerators = None,
    should_stop: Callable[[], bool] | None = None,
) -> ReverseResult:
    """Run the chain from x_T ~ N(0, I) * temperature down to x_0.

    `should_stop` is asked before every step; True raises SamplingInterrupted (a 1000-step DDPM
    chain outlasts the grace a launcher gives a preempted process to checkpoint).

    `denoise(x_i, t)` returns the U-Net prediction for the noisy state at model step t (B,).
    With `known`/`known_mask`, x <- x (1 - M) + known M after init and after every step (clean
    values at every noise level, as in the reference).
    """
    x = rng.randn(shape, generator, device=device) * sampler.temperature

    def clamp(v: torch.Tensor) -> torch.Tensor:
        if known is None or known_mask is None:
            return v
        return v * (1 - known_mask) + known.to(v.dtype) * known_mask

    x = clamp(x)
    keep = None if intermediate_step_indices is None else set(int(k) for k in intermediate_step_indices)
    samples: list[torch.Tensor] | None = [] if return_intermediates else None
    x0s: list[torch.Tensor] | None = [] if return_intermediates else None
    b = shape[0]
    for i in range(sampler.num_steps - 1, -1, -1):
        if should_stop is not None and should_stop():
            raise SamplingInterrupted(f"reverse diffusion stopped at loop index {i} of {sampler.num_steps}")
        t = torch.full((b,), sampler.model_step(i), device=device, dtype=torch.long)
        pred = denoise(x, t).float()
        if return_intermediates and (keep is None or i in keep):
            samples.append(x.detach().cpu())
            x0s.append(sampler.eps_and_x0(x, i, pred)[1].detach().cpu())
        x = clamp(sampler.step(x, i, pred, generator))
    return ReverseResult(x, samples, x0s)
