"""Noise schedules: reference values of the cosine schedule, the other schedules, the beta checks,
q_sample against its formula."""

import math

import pytest
import torch

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
