import math

import numpy as np
import pytest

from depthdif_hpc.config import OIConfig
from depthdif_hpc.inference.oi import (
    OIParams,
    analyse,
    correlation,
    fit_hyperparameters,
    haversine_km,
)

KM_PER_DEG = 2 * math.pi * 6371.0 / 360  # along the equator


def _params(depth=1, length=150.0, noise=0.1, signal=4.0, shape="gaussian"):
    return OIParams(shape, np.full(depth, length), np.full(depth, noise), np.full(depth, signal))


def test_haversine():
    assert haversine_km(0.0, 0.0, 0.0, 1.0) == pytest.approx(KM_PER_DEG)
    assert haversine_km(0.0, 179.5, 0.0, -179.5) == pytest.approx(KM_PER_DEG)  # across the dateline
    assert haversine_km(90.0, 0.0, -90.0, 0.0) == pytest.approx(math.pi * 6371.0)
    assert haversine_km(60.0, 0.0, 60.0, 1.0) == pytest.approx(KM_PER_DEG / 2, rel=2e-4)


def test_three_points_by_hand():
    # observations on the equator at lon 0, 1, 3 degrees; target at lon 2; Gaussian, L = 150 km
    s, e, length = 4.0, 0.1, 150.0
    d1 = KM_PER_DEG
    rho = lambda deg: math.exp(-((deg * d1 / length) ** 2))  # noqa: E731
    a = np.array([1.0, -0.5, 2.0])
    # K = s (R + e I), k = s r: written out from the formula
    K = s * np.array([[1 + e, rho(1), rho(3)],
                      [rho(1), 1 + e, rho(2)],
                      [rho(3), rho(2), 1 + e]])
    k = s * np.array([rho(2), rho(1), rho(1)])
    w = np.linalg.inv(K) @ k  # the OI weights
    mean_hand = 10.0 + w @ a
    var_hand = s - k @ np.linalg.inv(K) @ k
    mean, var = analyse(_params(length=length, noise=e, signal=s), np.array([[10.0]]),
                        np.array([0.0]), np.array([2.0]), np.zeros(3), np.array([0.0, 1.0, 3.0]), a[None])
    assert mean[0, 0] == pytest.approx(mean_hand, rel=1e-10)
    assert var[0, 0] == pytest.approx(var_hand, rel=1e-10)


def test_error_variance_limits():
    s, e = 2.5, 0.01
    p = _params(length=100.0, noise=e, signal=s)
    obs_lon = np.array([0.0, 20.0, 40.0])  # far apart compared with L
    tgt_lon = np.array([0.0, 20.0, 10.0, 90.0])
    mean, var = analyse(p, np.zeros((1, 4)), np.zeros(4), tgt_lon, np.zeros(3), obs_lon,
                        np.array([[1.0, 2.0, 3.0]]))
    # at an observation: s e / (1 + e), the noise level; far from every observation: s
    assert var[0, :2] == pytest.approx(s * e / (1 + e), rel=1e-6)
    assert var[0, 2:] == pytest.approx(s, rel=1e-6)
    assert mean[0, 1] == pytest.approx(2.0 / (1 + e), rel=1e-6) and abs(mean[0, 3]) < 1e-12
    # a level without observations keeps the background and the signal variance
    p2 = _params(depth=2, signal=3.0)
    bg = np.array([[1.0, 1.0], [7.0, 8.0]])
    mean2, var2 = analyse(p2, bg, np.zeros(2), np.array([0.0, 1.0]), np.zeros(1), np.zeros(1),
                          np.array([[0.5], [np.nan]]))
    assert mean2[1].tolist() == [7.0, 8.0] and var2[1].tolist() == [3.0, 3.0]


def test_roemmich_gilson_shape():
    d = np.array([0.0, 140.0, 1100.0])
    rg = correlation(d, "roemmich_gilson", 140.0, 1100.0, 0.77)
    assert rg[0] == pytest.approx(1.0)
    assert rg[1] == pytest.approx(0.77 * math.exp(-1) + 0.23 * math.exp(-140 / 1100))
    assert rg[2] > correlation(d, "gaussian", 140.0)[2] + 0.05  # the long tail
    with pytest.raises(ValueError, match="spherical"):
        correlation(d, "spherical", 100.0)


def test_fit_recovers_known_hyperparameters():
    # anomalies drawn from the model itself: L = 150 km, e = 0.1, s = 4 at level 0 and
    # L = 400 km, e = 0.03, s = 0.25 at level 1; level 2 never observed (takes level 1's)
    rng = np.random.default_rng(3)
    truth = [(150.0, 0.1, 4.0), (400.0, 0.03, 0.25)]
    samples = []
    for _ in range(60):
        lat, lon = rng.uniform(30, 36, 40), rng.uniform(-40, -34, 40)
        d = haversine_km(lat[:, None], lon[:, None], lat[None], lon[None])
        anom = np.full((3, 40), np.nan)
        for k, (length, e, s) in enumerate(truth):
            c = s * (correlation(d, "gaussian", length) + e * np.eye(40))
            anom[k] = np.linalg.cholesky(c) @ rng.standard_normal(40)
        samples.append((lat, lon, anom))
    p = fit_hyperparameters(samples, OIConfig(shared_across_levels=False), depth=3)
    assert p.length_km.tolist() == [150.0, 400.0, 400.0]
    assert p.noise_ratio.tolist() == [0.1, 0.03, 0.03]
    assert p.signal_var[0] == pytest.approx(4.0, rel=0.25) and p.signal_var[1] == pytest.approx(0.25, rel=0.35)
    assert p.fit["levels_without_data"] == [2]
    # shared across levels: one (length, noise) for every level, each level its own variance
    shared = fit_hyperparameters(samples, OIConfig(), depth=3)
    assert len(set(shared.length_km.tolist())) == 1 and len(set(shared.noise_ratio.tolist())) == 1
    assert shared.signal_var[0] > 8 * shared.signal_var[1]
