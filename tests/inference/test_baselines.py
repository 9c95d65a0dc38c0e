import math

import pytest
import torch

from depthdif_hpc.inference.baselines import Climatology, idw, surface_extended


def test_idw_hand_worked_example():
    # 1 x 3 grid, depth 2; columns at x=0 (10, 20) and x=2 (30, -) (second depth missing there)
    v = torch.zeros(1, 2, 1, 3)
    m = torch.zeros(1, 2, 1, 3, dtype=torch.bool)
    v[0, :, 0, 0] = torch.tensor([10.0, 20.0])
    m[0, :, 0, 0] = True
    v[0, 0, 0, 2] = 30.0
    m[0, 0, 0, 2] = True
    out = idw(v, m, power=2.0)
    # middle pixel: distances 1 and 1 -> plain mean at depth 0; only column 0 at depth 1
    assert float(out[0, 0, 0, 1]) == pytest.approx(20.0)
    assert float(out[0, 1, 0, 1]) == pytest.approx(20.0)
    # observed pixels keep their values
    assert float(out[0, 0, 0, 0]) == 10.0 and float(out[0, 0, 0, 2]) == 30.0
    # pixel 2 at depth 1 is not observed: interpolated from column 0 only
    assert float(out[0, 1, 0, 2]) == pytest.approx(20.0)


def test_idw_weights_by_inverse_square_distance():
    v = torch.zeros(1, 1, 1, 4)
    m = torch.zeros(1, 1, 1, 4, dtype=torch.bool)
    v[0, 0, 0, 0], v[0, 0, 0, 3] = 0.0, 9.0
    m[0, 0, 0, 0] = m[0, 0, 0, 3] = True
    out = idw(v, m)
    w0, w3 = 1 / 1**2, 1 / 2**2  # pixel 1: distance 1 to col 0, 2 to col 3
    assert float(out[0, 0, 0, 1]) == pytest.approx((0 * w0 + 9 * w3) / (w0 + w3))


def test_idw_no_observation_is_nan():
    out = idw(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4, dtype=torch.bool))
    assert torch.isnan(out).all()


def test_climatology_window_and_fallback():
    temps = torch.zeros(3, 2, 2, 2)
    temps[0] = 10.0
    temps[1] = 20.0
    temps[2, 0] = 5.0
    temps[2, 1] = 7.0
    valid = torch.ones_like(temps, dtype=torch.bool)
    valid[2, 1, 0, 0] = False  # excluded from the mean
    temps[2, 1, 0, 0] = 1e6
    dates = torch.tensor([20180101, 20180105, 20180701])
    clim = Climatology.fit(temps, valid, dates, window_days=10)
    assert float(clim.table[0, 0]) == pytest.approx(15.0)  # Jan 1: samples 0 and 1
    assert float(clim.table[181, 1]) == pytest.approx(7.0)  # Jul 1 (doy 182): sample 2 only
    # a day far from every sample falls back to the all-year mean of that depth
    assert float(clim.table[90, 0]) == pytest.approx((10 * 4 + 20 * 4 + 5 * 4) / 12)
    pred = clim.predict(torch.tensor([20180101]), (1, 2, 2, 2))
    assert pred.shape == (1, 2, 2, 2) and float(pred[0, 0, 1, 1]) == pytest.approx(15.0)


def test_surface_extended():
    sst = torch.tensor([[[[20.0, 22.0]]]])
    prof = torch.tensor([18.0, 15.0, 4.0])
    out = surface_extended(sst, prof)
    assert out.shape == (1, 3, 1, 2)
    assert out[0, :, 0, 1].tolist() == [22.0, 19.0, 8.0]
    assert not math.isnan(float(out.sum()))
