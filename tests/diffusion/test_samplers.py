"""DDPM and DDIM samplers: step maps and single steps by hand, the reverse loop's clamping,
intermediates and temperature."""

import math

import pytest
import torch

from depthdif_hpc.diffusion.samplers import DDIMSampler, DDPMSampler, reverse_diffusion
from depthdif_hpc.diffusion.schedules import make_betas


def test_ddim_step_map_s100():
    smp = DDIMSampler(make_betas("cosine", 1000, 1e-4, 2e-2), "x0", 100)
    tau = smp.tau.tolist()
    assert len(tau) == 100 and tau[:4] == [0, 10, 20, 30] and tau[-2:] == [989, 999]
    assert all(b > a for a, b in zip(tau, tau[1:], strict=False))
    assert smp.timesteps[0] == 999 and smp.timesteps[-1] == 0
    assert [smp.model_step(i) for i in (0, 1, 99)] == [0, 10, 999]
    assert DDIMSampler(make_betas("linear", 50, 1e-4, 2e-2), "x0", 100).num_steps == 50


def _linear_sched(t=10):
    betas = make_betas("linear", t, 0.01, 0.2)
    alphas = 1 - betas
    return betas, alphas, torch.cumprod(alphas, 0)


def test_ddpm_step_x0_param_by_hand():
    betas, alphas, ab = _linear_sched()
    smp = DDPMSampler(betas, "x0")
    x, x0 = torch.tensor([[0.7]]), torch.tensor([[0.2]])
    i = 5
    eps = (0.7 - math.sqrt(ab[i]) * 0.2) / math.sqrt(1 - ab[i])
    mean = (0.7 - betas[i] / math.sqrt(1 - ab[i]) * eps) / math.sqrt(alphas[i])
    g = torch.Generator().manual_seed(3)
    z = torch.randn((1, 1), generator=torch.Generator().manual_seed(3))
    out = smp.step(x, i, x0, generator=g)
    assert float(out) == pytest.approx(float(mean + math.sqrt(betas[i]) * z), rel=1e-6)
    assert float(smp.step(x, 0, x0)) == pytest.approx(
        float((0.7 - betas[0] / math.sqrt(1 - ab[0]) * ((0.7 - math.sqrt(ab[0]) * 0.2) / math.sqrt(1 - ab[0])))
              / math.sqrt(alphas[0])), rel=1e-6)


def test_ddpm_step_eps_param_by_hand():
    betas, alphas, ab = _linear_sched()
    smp = DDPMSampler(betas, "epsilon")
    out = smp.step(torch.tensor([1.5]), 0, torch.tensor([0.3]))
    ref = (1.5 - betas[0] / math.sqrt(1 - ab[0]) * 0.3) / math.sqrt(alphas[0])
    assert float(out) == pytest.approx(float(ref), rel=1e-6)


def test_ddim_step_by_hand_eta0_and_eta():
    betas, _, ab = _linear_sched()
    smp = DDIMSampler(betas, "x0", num_steps=4)  # tau = round(linspace(0, 9, 4)) = 0, 3, 6, 9
    assert smp.tau.tolist() == [0, 3, 6, 9]
    x, x0 = torch.tensor([0.9]), torch.tensor([-0.4])
    a, ap = float(ab[6]), float(ab[3])
    eps = (0.9 - math.sqrt(a) * -0.4) / math.sqrt(1 - a)
    ref = math.sqrt(ap) * -0.4 + math.sqrt(1 - ap) * eps
    assert float(smp.step(x, 2, x0)) == pytest.approx(ref, rel=1e-6)
    # last step: abar_prev = 1 -> returns x0 exactly
    assert float(smp.step(x, 0, x0)) == pytest.approx(-0.4, rel=1e-6)
    smp_eta = DDIMSampler(betas, "x0", num_steps=4, eta=0.5, temperature=0.7)
    sigma = 0.5 * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    z = torch.randn((1,), generator=torch.Generator().manual_seed(5))
    ref_eta = math.sqrt(ap) * -0.4 + math.sqrt(1 - ap - sigma**2) * eps + sigma * 0.7 * float(z)
    out = smp_eta.step(x, 2, x0, generator=torch.Generator().manual_seed(5))
    assert float(out) == pytest.approx(ref_eta, rel=1e-6)


def test_reverse_loop_passes_mapped_steps_and_clamps():
    betas, _, _ = _linear_sched(20)
    smp = DDIMSampler(betas, "x0", num_steps=5)
    seen = []
    known = torch.full((2, 3, 4, 4), 0.123)
    mask = torch.zeros(2, 3, 4, 4)
    mask[:, 1, 2, :] = 1

    def denoise(x, t):
        seen.append(t.tolist())
        assert torch.equal(x[mask.bool()], known[mask.bool()])  # clamped before every call
        return torch.zeros_like(x)

    res = reverse_diffusion(denoise, smp, (2, 3, 4, 4), device=torch.device("cpu"), known=known,
                            known_mask=mask, return_intermediates=True)
    assert [s[0] for s in seen] == smp.tau.flip(0).tolist() == [19, 14, 10, 5, 0]
    assert torch.equal(res.sample[mask.bool()], known[mask.bool()])
    assert len(res.denoise_samples) == 5 and len(res.x0_denoise_samples) == 5


def test_reverse_loop_intermediate_subset_and_temperature():
    smp = DDIMSampler(make_betas("linear", 10, 0.01, 0.2), "x0", 10, temperature=0.0)
    res = reverse_diffusion(lambda x, t: torch.ones_like(x), smp, (1, 1, 2, 2), device=torch.device("cpu"),
                            return_intermediates=True, intermediate_step_indices=[9, 0])
    assert len(res.denoise_samples) == 2
    assert torch.equal(res.denoise_samples[0], torch.zeros(1, 1, 2, 2))  # temperature 0 start
    torch.testing.assert_close(res.sample, torch.ones(1, 1, 2, 2))
