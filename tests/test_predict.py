import warnings

import pytest
import torch

from depthdif_hpc import build_model
from depthdif_hpc.model.depthdif import Prediction
from depthdif_hpc.model.postprocess import (
    gaussian_blur_depthwise,
    gaussian_kernel1d,
    mask_invalid,
)
from depthdif_hpc.normalization import denormalize_temperature, normalize_temperature
from tests.helpers import random_batch, tiny_config


def test_normalisation_round_trip_and_values():
    t = torch.tensor([-2.0, 16.59267177946783, 30.0])
    z = normalize_temperature(t)
    assert float(z[1]) == pytest.approx(0.0, abs=1e-6)
    assert float(z[2]) == pytest.approx((30 + 273.15 - 289.74267177946783) / 10.933397487585731)
    torch.testing.assert_close(denormalize_temperature(z), t)


def test_blur_keeps_channels_separate():
    x = torch.zeros(1, 3, 9, 9)
    x[0, 1, 4, 4] = 1.0
    out = gaussian_blur_depthwise(x, 5, 0.75)
    assert out[0, 0].abs().max() == 0 and out[0, 2].abs().max() == 0
    assert float(out[0, 1].sum()) == pytest.approx(1.0, rel=1e-5)  # mass kept away from borders
    k = gaussian_kernel1d(5, 0.75)
    torch.testing.assert_close(out[0, 1, 2:7, 2:7], torch.outer(k, k))


def test_blur_even_kernel_bumped_and_disabled_cases():
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(gaussian_blur_depthwise(x, 4, 1.0), gaussian_blur_depthwise(x, 5, 1.0))
    assert gaussian_blur_depthwise(x, 1, 1.0) is x
    assert gaussian_blur_depthwise(x, 3, 0.0) is x
    const = torch.full((1, 2, 6, 6), 3.0)  # reflect padding keeps a constant field constant
    torch.testing.assert_close(gaussian_blur_depthwise(const, 5, 2.0), const)


def test_mask_invalid_sets_nan_only_outside():
    v = torch.randn(2, 3, 4, 4)
    m = torch.ones(2, 3, 4, 4, dtype=torch.bool)
    m[0, 2, 1, :] = False
    out = mask_invalid(v, m)
    assert torch.isnan(out[0, 2, 1]).all()
    assert torch.isnan(out).sum() == 4
    torch.testing.assert_close(out[m], v[m])


@pytest.mark.parametrize("ambient", [False, True])
def test_predict_outputs(ambient):
    cfg = tiny_config(ambient=ambient, overrides=["model.post_process.gaussian_blur.enabled=true"])
    model = build_model(cfg).eval()
    batch = random_batch()
    out = model.predict(batch, sampler="ddim", return_intermediates=True,
                        generator=torch.Generator().manual_seed(0))
    assert isinstance(out, Prediction) and out.x0_denoise_samples is not None
    assert out.y_hat.shape == (2, 50, 16, 16) and torch.isfinite(out.y_hat).all()
    assert out.sampler.name == "ddim"
    invalid = ~batch["y_valid_mask"]
    assert torch.isnan(out.y_hat_denorm[invalid]).all()
    assert torch.isfinite(out.y_hat_denorm[~invalid]).all()
    assert len(out.denoise_samples) == out.sampler.num_steps
    # inference conditions on every observation in ambient mode unless configured otherwise
    torch.testing.assert_close(out.further_valid_mask, batch["x_valid_mask"].float())


def test_predict_clamping_keeps_known_pixels_exact():
    cfg = tiny_config(overrides=["model.post_process.gaussian_blur.enabled=false"])
    model = build_model(cfg).eval()
    batch = random_batch(obs_frac=0.3)
    out = model.predict(batch, sampler="ddpm", clamp_known_pixels=True,
                        generator=torch.Generator().manual_seed(0))
    known = batch["x_valid_mask"]
    assert torch.equal(out.y_hat[known], batch["x"][known])
    unclamped = model.predict(batch, sampler="ddpm", clamp_known_pixels=False,
                              generator=torch.Generator().manual_seed(0))
    assert not torch.equal(unclamped.y_hat[known], batch["x"][known])


def test_clamping_skipped_with_warning_for_channel_mismatch():
    cfg = tiny_config(overrides=["model.generated_channels=2", "model.condition_channels=52",
                                 "model.post_process.gaussian_blur.enabled=false"])
    model = build_model(cfg).eval()
    batch = random_batch()
    batch["y_valid_mask"] = batch["y_valid_mask"][:, :2]
    batch["y"] = batch["y"][:, :2]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = model.predict(batch, sampler="ddim", clamp_known_pixels=True)
    assert any("clamp_known_pixels skipped" in str(w.message) for w in rec)
    assert out.y_hat.shape == (2, 2, 16, 16)


def test_predict_requires_keys():
    model = build_model(tiny_config())
    batch = random_batch()
    del batch["y_valid_mask"]
    with pytest.raises(KeyError, match="y_valid_mask"):
        model.predict(batch)
