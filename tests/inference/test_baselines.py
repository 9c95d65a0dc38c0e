import math

import pytest
import torch

from depthdif_hpc.inference.baselines import idw, surface_extended


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


def test_surface_extended():
    sst = torch.tensor([[[[20.0, 22.0]]]])
    # background per pixel: 18/15/4 at pixel 0, 19/17/5 at pixel 1
    bg = torch.tensor([[[18.0, 19.0]], [[15.0, 17.0]], [[4.0, 5.0]]])[None]
    out = surface_extended(sst, bg)
    assert out.shape == (1, 3, 1, 2)
    assert out[0, :, 0, 0].tolist() == [20.0, 17.0, 6.0]  # anomaly +2 carried down
    assert out[0, :, 0, 1].tolist() == [22.0, 20.0, 8.0]  # anomaly +3
    assert not math.isnan(float(out.sum()))
    with pytest.raises(ValueError, match="do not match"):
        surface_extended(sst, bg[:, :, :, :1])
