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


def test_per_level_round_trip_and_level_statistics():
    import numpy as np

    from depthdif_hpc.normalization import GLOBAL, Normalizer

    mean_c = np.linspace(20.0, 2.0, 50)
    std_c = np.linspace(3.0, 0.05, 50)
    norm = Normalizer.per_level(mean_c, std_c)
    t = torch.from_numpy(mean_c + 2.0 * std_c).double().view(1, 50, 1, 1).expand(2, 50, 3, 4)
    z = norm.normalize(t)
    # Each level is its own z-score: mean + 2 std is 2 at every depth (0.002 at 0.05 degC std
    # under the global z-score would be 0.0002).
    torch.testing.assert_close(z, torch.full_like(z, 2.0))
    torch.testing.assert_close(norm.denormalize(z), t)
    # A one-channel field (eo) takes level 0; other channel counts are refused.
    eo = torch.full((2, 1, 3, 4), 23.0, dtype=torch.float64)
    torch.testing.assert_close(norm.normalize(eo), (eo - 20.0) / 3.0)
    with pytest.raises(ValueError, match="50 levels; cannot apply it to 7 channels"):
        norm.normalize(torch.zeros(1, 7, 2, 2))
    with pytest.raises(ValueError, match="std > 0"):
        Normalizer.per_level(mean_c, np.zeros(50))
    # The global normaliser is the reference's function, bit for bit.
    t32 = torch.randn(2, 50, 3, 4) * 5 + 10
    assert torch.equal(GLOBAL.normalize(t32), normalize_temperature(t32))
    assert torch.equal(GLOBAL.denormalize(t32), denormalize_temperature(t32))
