"""Probabilistic scores: CRPS (scoringrules), spread-skill, rank histograms, R^2."""

import math

import numpy as np
import pytest

from depthdif_hpc.metrics import (
    DepthMean,
    DepthStats,
    crps_ensemble_fair,
    crps_gaussian,
    ensemble_ranks,
    spread_skill,
    two_pixel_power,
)


def test_fair_crps_of_a_large_gaussian_ensemble_matches_the_closed_form():
    rng = np.random.default_rng(0)
    # the fair estimator costs M^2 per point: 150 points x 400 members keep this ~1 s
    mu, sigma = rng.normal(10, 3, 150), rng.uniform(0.2, 2.0, 150)
    obs = rng.normal(mu, 1.0)
    members = rng.normal(mu[:, None], sigma[:, None], (150, 400))
    ens = crps_ensemble_fair(obs, members)
    exact = crps_gaussian(obs, mu, sigma)
    # the textbook value at the mean: sigma (sqrt(2) - 1) / sqrt(pi)
    assert crps_gaussian(np.zeros(1), np.zeros(1), np.ones(1))[0] == pytest.approx(
        (math.sqrt(2) - 1) / math.sqrt(math.pi))
    assert np.abs(ens - exact).max() < 0.1 * sigma.max()
    assert ens.mean() == pytest.approx(exact.mean(), rel=0.02)
    # a visibly wrong forecast (sigma doubled) is told apart at this ensemble size
    assert abs(crps_gaussian(obs, mu, 2 * sigma).mean() - ens.mean()) > 0.1 * ens.mean()
    with pytest.raises(ValueError, match="M >= 2"):
        crps_ensemble_fair(obs, members[:, :1])


def _calibrated(rng, n, m, spread_scale=1.0):
    """Truth and members drawn from the same N(mu, s^2); spread_scale < 1 makes it over-confident."""
    mu, s = rng.normal(0, 5, n), rng.uniform(0.5, 1.5, n)
    truth = rng.normal(mu, s)
    members = rng.normal(mu[:, None], spread_scale * s[:, None], (n, m))
    return truth, members


def test_spread_skill_of_a_calibrated_ensemble_is_one():
    rng = np.random.default_rng(1)
    m = 4
    truth, members = _calibrated(rng, 40000, m)
    mean, var = members.mean(1), members.var(1, ddof=1)
    ratio = spread_skill(var.mean(), ((mean - truth) ** 2).mean(), m)
    assert ratio == pytest.approx(1.0, abs=0.03)
    truth, members = _calibrated(rng, 40000, m, spread_scale=0.25)
    mean, var = members.mean(1), members.var(1, ddof=1)
    assert spread_skill(var.mean(), ((mean - truth) ** 2).mean(), m) < 0.4
    # a Gaussian forecast N(mu, s^2) of the same truth: no ensemble factor
    mu_s = rng.normal(0, 1, 40000)
    assert spread_skill(1.0, ((rng.normal(mu_s, 1.0) - mu_s) ** 2).mean(), None) == pytest.approx(1.0, abs=0.03)


def test_rank_histogram_flat_when_calibrated_u_shaped_when_not():
    rng = np.random.default_rng(2)
    m, n = 5, 30000
    truth, members = _calibrated(rng, n, m)
    counts = np.bincount(ensemble_ranks(truth, members, rng), minlength=m + 1)
    assert counts.sum() == n and len(counts) == m + 1
    assert np.abs(counts / (n / (m + 1)) - 1).max() < 0.06
    truth, members = _calibrated(rng, n, m, spread_scale=0.3)
    counts = np.bincount(ensemble_ranks(truth, members, rng), minlength=m + 1)
    assert counts[0] > 2 * counts[m // 2] and counts[-1] > 2 * counts[m // 2]


def test_rank_ties_are_spread():
    rng = np.random.default_rng(3)
    members = np.zeros((6000, 3))  # every member equals the truth: ranks uniform over 0..3
    counts = np.bincount(ensemble_ranks(np.zeros(6000), members, rng), minlength=4)
    assert np.abs(counts / 1500 - 1).max() < 0.1


def test_r2_and_depth_mean_by_hand():
    st = DepthStats(2)
    truth = np.array([[[1.0, 2.0, 3.0]], [[5.0, 5.0, 5.0]]])
    pred = np.array([[[1.0, 2.0, 4.0]], [[5.0, 6.0, 5.0]]])
    st.add(pred, truth, np.ones_like(truth, dtype=bool))
    pd = st.per_depth()
    # level 0: SSE 1, SST about the mean 2 is 2 -> R^2 = 0.5; level 1: constant truth -> undefined
    assert pd["r2"][0] == pytest.approx(0.5) and math.isnan(pd["r2"][1])
    # overall: SSE of both levels (1 + 1) over the within-level SST (2 + 0)
    assert st.overall()["r2"] == pytest.approx(1 - 2 / 2)
    dm = DepthMean(3)
    dm.add(np.array([1.0, 3.0, 10.0]), np.array([0, 0, 2]))
    assert dm.per_depth()[0] == 2.0 and math.isnan(dm.per_depth()[1]) and dm.per_depth()[2] == 10.0
    assert dm.overall() == pytest.approx(14 / 3)


def test_two_pixel_power_finds_the_checkerboard_and_nothing_in_smooth_fields():
    h, w = 16, 12
    i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    smooth = np.sin(2 * np.pi * i / h) + np.cos(2 * np.pi * j / w)
    fields = np.stack([(-1.0) ** (i + j), (-1.0) ** i, smooth, smooth + 0.5 * (-1.0) ** j])
    nyq, total = two_pixel_power(fields)
    share = nyq / total
    assert np.allclose(share[:2], 1.0) and share[2] < 1e-20
    # equal amplitudes 1 and 0.5 over a smooth field of power 1 (two unit sinusoids): 0.25 / 1.25
    assert math.isclose(share[3], 0.25 / 1.25, rel_tol=1e-9)
    # white noise spreads evenly: the Nyquist row and column hold (H + W - 1) of H W frequencies
    noise = np.random.default_rng(0).standard_normal((200, h, w))
    nyq, total = two_pixel_power(noise)
    assert abs(nyq.sum() / total.sum() - (h + w - 1) / (h * w - 1)) < 0.01
    # NaN is 0; an odd size drops its last row and column
    odd = np.pad(fields[:1], ((0, 0), (0, 1), (0, 1)), constant_values=np.nan)
    assert np.allclose(np.divide(*two_pixel_power(odd)), 1.0)
    with pytest.raises(ValueError, match="field"):
        two_pixel_power(np.zeros((4, 4)))
