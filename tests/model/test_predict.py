"""DepthDif.predict: outputs of both objectives, clamping of known pixels (and when it is
skipped), required inputs."""

import warnings

import pytest
import torch

from depthdif_hpc import build_model
from depthdif_hpc.model.depthdif import Prediction
from tests.helpers import random_batch, tiny_config


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
