"""Temperature normalisation: the reference constants and the round trip."""

import pytest
import torch

from depthdif_hpc.normalization import denormalize_temperature, normalize_temperature


def test_normalisation_round_trip_and_values():
    t = torch.tensor([-2.0, 16.59267177946783, 30.0])
    z = normalize_temperature(t)
    assert float(z[1]) == pytest.approx(0.0, abs=1e-6)
    assert float(z[2]) == pytest.approx((30 + 273.15 - 289.74267177946783) / 10.933397487585731)
    torch.testing.assert_close(denormalize_temperature(z), t)
