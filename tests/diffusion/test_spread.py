"""Ensemble spread of the samplers with an exact denoiser (docs/model.md#ensemble-spread).

For x0 ~ N(mu, s^2) per element the posterior mean E[x0 | x_t] is known in closed form, so the
samplers can be checked for calibration without a trained network: the spread of their samples
must match s. A small s is the case of a deep level under the global z-score (s ~ 0.02).
"""

from __future__ import annotations

import pytest
import torch

from depthdif_hpc.diffusion.samplers import (
    DDIMSampler,
    ddim_timesteps,
    make_sampler,
    reverse_diffusion,
)

MU = 0.3
N = 4000


def _sampler(name: str, steps: int = 20, eta: float = 0.0, discretization: str = "uniform"):
    return make_sampler(name, schedule="cosine", num_timesteps=1000, beta_start=1e-4, beta_end=2e-2,
                        parameterization="x0", ddim_num_timesteps=steps, ddim_eta=eta,
                        ddim_discretization=discretization)


def _spread_ratio(smp, s: float, ignore_xt: bool = False) -> float:
    """std of N samples / s, with the exact posterior-mean denoiser of N(MU, s^2) (or, with
    `ignore_xt`, one that always answers the prior mean, as a briefly trained model does)."""
    ab_all = smp.alphas_cumprod.float()

    def oracle(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if ignore_xt:
            return torch.full_like(x, MU)
        ab = ab_all[t].view(-1, 1, 1)
        return MU + s * s * ab.sqrt() / (ab * s * s + 1 - ab) * (x - ab.sqrt() * MU)

    g = torch.Generator().manual_seed(1)
    out = reverse_diffusion(oracle, smp, (1, 1, N), device=torch.device("cpu"), generator=g).sample
    return out.std().item() / s


def test_quadratic_ddim_keeps_the_spread_of_a_small_signal():
    # Measured (20,000 elements): uniform 0.47, quadratic 0.82 of the true spread at s = 0.02.
    s = 0.02
    uniform = _spread_ratio(_sampler("ddim"), s)
    quadratic = _spread_ratio(_sampler("ddim", discretization="quadratic"), s)
    assert uniform < 0.6
    assert 0.75 < quadratic < 1.05


def test_ddpm_is_calibrated_with_an_exact_denoiser():
    assert _spread_ratio(_sampler("ddpm"), 0.1) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_a_denoiser_that_ignores_x_t_collapses_every_sampler(name, eta):
    # The final step returns the x0 estimate itself, so no sampler noise survives: spread has to
    # come from the network's use of x_t.
    assert _spread_ratio(_sampler(name, eta=eta), 0.02, ignore_xt=True) < 1e-5


@pytest.mark.parametrize("total", [10, 50, 1000])
def test_ddim_timesteps_quadratic_is_strictly_increasing_over_the_whole_chain(total):
    for steps in (1, 2, 3, total // 2, total - 1, total, total + 5):
        tau = ddim_timesteps(total, steps, "quadratic")
        assert len(tau) == min(steps, total)
        if len(tau) > 1:
            assert tau[0] == 0 and tau[-1] == total - 1
            assert bool((tau[1:] > tau[:-1]).all())
    assert ddim_timesteps(1000, 20, "quadratic")[:4].tolist() == [0, 3, 11, 25]
    assert ddim_timesteps(1000, 20, "uniform")[:3].tolist() == [0, 53, 105]


def test_unknown_discretization_is_refused():
    with pytest.raises(ValueError, match="cubic"):
        DDIMSampler(torch.full((10,), 0.01), "x0", 5, discretization="cubic")


def test_the_model_config_chooses_the_discretization():
    from depthdif_hpc.config import ModelConfig
    from depthdif_hpc.model.depthdif import DepthDif

    cfg = ModelConfig()
    cfg.unet.dim, cfg.unet.dim_mults = 8, [1, 2]
    cfg.sampling.ddim_num_timesteps = 20
    model = DepthDif(cfg)
    assert model.make_sampler("ddim").tau[:3].tolist() == [0, 53, 105]
    cfg.sampling.ddim_discretization = "quadratic"
    assert model.make_sampler("ddim").tau[:4].tolist() == [0, 3, 11, 25]
    # predict's per-call overrides reach it too
    assert model.make_sampler("ddim", ddim_discretization="uniform").tau[1].item() == 53
