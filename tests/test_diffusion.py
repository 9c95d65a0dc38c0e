import math

import pytest
import torch

from depthdif_hpc.diffusion.masks import align_mask, masked_mse
from depthdif_hpc.diffusion.samplers import DDIMSampler, DDPMSampler, reverse_diffusion
from depthdif_hpc.diffusion.schedules import NoiseSchedule, make_betas


@pytest.mark.parametrize(
    ("t", "beta", "abar", "rel"),
    [(0, 4.13e-5, 0.99996, 5e-3), (99, 5.27e-4, 0.9721, 5e-3), (499, 3.15e-3, 0.4938, 5e-3),
     (899, 0.01954, 0.0241, 5e-3), (998, 0.75, 2.4e-6, 2e-2), (999, 0.999, 2.4e-9, 2e-2)],
)
def test_cosine_schedule_reference_values(t, beta, abar, rel):
    s = NoiseSchedule("cosine", 1000, 1e-4, 2e-2)
    assert float(s.betas[t]) == pytest.approx(beta, rel=rel)
    assert float(s.alphas_cumprod[t]) == pytest.approx(abar, rel=rel)


def test_cosine_clips_last_beta_and_ignores_betas():
    a = make_betas("cosine", 1000, 1e-4, 2e-2)
    b = make_betas("cosine", 1000, 1e-3, 5e-1)
    assert float(a[-1]) == 0.999
    torch.testing.assert_close(a, b)


def test_other_schedules():
    torch.testing.assert_close(make_betas("linear", 3, 0.1, 0.3), torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    q = make_betas("quadratic", 3, 0.01, 0.09)
    torch.testing.assert_close(q, torch.tensor([0.01, 0.04, 0.09], dtype=torch.float64))
    sg = make_betas("sigmoid", 3, 0.1, 0.3)
    assert float(sg[1]) == pytest.approx(0.2)
    assert float(sg[0]) == pytest.approx(1 / (1 + math.exp(6)) * 0.2 + 0.1)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(("start", "end"), [(2e-2, 1e-4), (0.0, 0.1), (0.1, 1.0)])
def test_bad_betas_rejected_for_every_schedule(schedule, start, end):
    with pytest.raises(ValueError, match="beta_start < beta_end"):
        make_betas(schedule, 10, start, end)


def test_q_sample_formula():
    s = NoiseSchedule("linear", 10, 0.1, 0.2)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0, 9])
    xt = s.q_sample(x0, t, eps)
    ab = torch.cumprod(1 - torch.linspace(0.1, 0.2, 10, dtype=torch.float64), 0)
    for i, ti in enumerate(t.tolist()):
        ref = math.sqrt(ab[ti]) * x0[i] + math.sqrt(1 - ab[ti]) * eps[i]
        torch.testing.assert_close(xt[i], ref.float())


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


def test_masked_mse_by_hand_and_empty():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    tgt = torch.tensor([[[[0.0, 0.0], [1.0, 10.0]]]])
    mask = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert float(masked_mse(pred, tgt, mask)) == pytest.approx((1 + 4) / 2)
    assert float(masked_mse(pred, tgt, torch.zeros_like(mask))) == 0.0
    assert float(masked_mse(pred, tgt, None)) == pytest.approx((1 + 4 + 4 + 36) / 4)


def test_align_mask_rules():
    m = torch.zeros(2, 3, 4, 4)
    m[0, 1, 2, 3] = 0.7
    one = align_mask(m, 1)
    assert one.shape == (2, 1, 4, 4) and one[0, 0, 2, 3] == 1 and one.sum() == 1
    assert align_mask(one, 5).shape == (2, 5, 4, 4)
    assert align_mask(torch.ones(2, 4, 4), 3).shape == (2, 3, 4, 4)
    assert align_mask(torch.full((1, 1, 2, 2), 0.5), 1).sum() == 0  # binarised as > 0.5
    with pytest.raises(ValueError, match="3-channel mask to 5"):
        align_mask(m, 5)
