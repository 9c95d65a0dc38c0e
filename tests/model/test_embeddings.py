"""Time, coordinate and date embeddings: values by hand, encodings, the encoder's inputs."""

import datetime
import math

import pytest
import torch

from depthdif_hpc.model.embeddings import (
    CoordDateEncoder,
    SinusoidalTimeEmbedding,
    day_of_year,
    encode_coords,
    encode_date,
)


def test_sinusoidal_time_embedding_values():
    emb = SinusoidalTimeEmbedding(8)(torch.tensor([0, 3]))
    half = 4
    w = [math.exp(-k * math.log(10000) / (half - 1)) for k in range(half)]
    ref = [math.sin(3 * wk) for wk in w] + [math.cos(3 * wk) for wk in w]
    torch.testing.assert_close(emb[1], torch.tensor(ref))
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_coord_encodings():
    c = torch.tensor([[90.0, 0.0], [0.0, 90.0], [45.0, -180.0]])
    us = encode_coords(c, "unit_sphere")
    torch.testing.assert_close(us[0], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(us[1], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(us.norm(dim=1), torch.ones(3))
    sc = encode_coords(c, "sincos")
    assert sc.shape == (3, 4)
    torch.testing.assert_close(sc[2], torch.tensor([math.sin(math.pi / 4), math.cos(math.pi / 4), 0.0, -1.0]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(encode_coords(c, "raw")[2], torch.tensor([0.5, -1.0]))
    with pytest.raises(ValueError, match="unknown coord encoding"):
        encode_coords(c, "mercator")


def test_day_of_year_and_date_encoding():
    doy = day_of_year(torch.tensor([20180101, 20180301, 20181231, 20200228]))
    assert doy.tolist() == [1, 60, 365, 59]
    enc = encode_date(torch.tensor([20181231]))
    torch.testing.assert_close(enc[0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    for bad in (20181301, 20180230, 20180100, 2018):
        with pytest.raises(ValueError, match=str(bad)):
            day_of_year(torch.tensor([20180101, bad]))


def test_day_of_year_is_the_calendar_on_every_day():
    days = [datetime.date(2019, 1, 1) + datetime.timedelta(n) for n in range(365)]
    dates = torch.tensor([d.year * 10000 + d.month * 100 + d.day for d in days])
    assert day_of_year(dates).tolist() == [d.timetuple().tm_yday for d in days]
    # Leap years keep the common-year count (Feb 29 is not a valid date of that calendar).
    for bad in (20200229, 20190431, 20190631, 20190931, 20191131, 20190132, 20190000):
        with pytest.raises(ValueError, match=str(bad)):
            day_of_year(torch.tensor([bad]))


def test_coord_encoder_requires_inputs():
    enc = CoordDateEncoder(8)
    assert enc(torch.zeros(2, 2), torch.tensor([20180101, 20180102])).shape == (2, 8)
    with pytest.raises(ValueError, match="no 'coords'"):
        enc(None, torch.tensor([20180101]))
    with pytest.raises(ValueError, match="no 'date'"):
        enc(torch.zeros(1, 2), None)
