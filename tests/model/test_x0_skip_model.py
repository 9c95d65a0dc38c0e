"""`model.x0_skip` in the model (docs/model.md#gaussian-x0-skip): the objective and predict both go
through it, it composes with ambient mode, it is checked, and the default keeps the research
state-dict layout."""

from __future__ import annotations

import pytest
import torch

from depthdif_hpc import build_model
from depthdif_hpc.diffusion.x0_skip import GaussianX0Skip
from tests.helpers import random_batch, tiny_config

KEY = "x0_skip.log_var_scaled"


def test_default_keeps_the_layout_and_old_weights_load_strictly():
    old = build_model(tiny_config()).state_dict()
    assert not any(k.startswith("x0_skip") for k in old)
    build_model(tiny_config()).load_state_dict(old, strict=True)
    skip = build_model(tiny_config(overrides=["model.x0_skip=gaussian"]))
    assert set(skip.state_dict()) == set(old) | {KEY}
    with pytest.raises(RuntimeError, match=KEY):
        skip.load_state_dict(old, strict=True)


def test_config_refuses_an_unknown_mode_and_the_epsilon_parameterization():
    with pytest.raises(Exception, match="model.x0_skip"):
        tiny_config(overrides=["model.x0_skip=laplace"])
    with pytest.raises(Exception, match="model.x0_skip"):
        tiny_config(overrides=["model.x0_skip=gaussian", "model.parameterization=epsilon"])


def _mean_only(model: torch.nn.Module) -> None:
    """Make the U-Net answer a constant whatever x_t, as the briefly trained demo network does."""
    class Const(torch.nn.Module):
        def forward(self, inp, t, c_emb=None):
            return torch.full((inp.shape[0], model.cfg.generated_channels, *inp.shape[-2:]), 0.1)
    model.model = Const()


@pytest.mark.parametrize("skip,spread", [("none", False), ("gaussian", True)])
def test_predict_spreads_members_only_through_the_skip(skip, spread):
    model = build_model(tiny_config(overrides=[f"model.x0_skip={skip}", "model.noise.num_timesteps=200"])).eval()
    if model.x0_skip is not None:
        with torch.no_grad():
            model.x0_skip.log_var_scaled.fill_(torch.log(torch.tensor(0.01)).item() / 10.0)
    _mean_only(model)
    batch = {k: torch.cat([v[:1]] * 4) for k, v in random_batch(b=1).items()}
    sampler = model.make_sampler("ddim", ddim_num_timesteps=20, ddim_discretization="quadratic")
    out = model.predict(batch, sampler=sampler, clamp_known_pixels=False,
                        generator=torch.Generator().manual_seed(0)).y_hat
    std = float(out.std(dim=0).mean())
    if spread:
        assert 0.05 < std < 0.15  # s = 0.1 model units
    else:
        assert std < 1e-6


@pytest.mark.parametrize("ambient,mode", [(False, "gaussian"), (True, "gaussian"), (False, "gaussian_spectral")])
def test_the_objective_fits_the_variance_and_reports_the_mse(ambient, mode):
    model = build_model(tiny_config(ambient=ambient, overrides=[f"model.x0_skip={mode}"]))
    assert isinstance(model.x0_skip, GaussianX0Skip)
    batch = random_batch()
    sched = model.schedule
    for noisy, ab in ((False, 0.99), (True, 0.05)):  # every draw far below / above the threshold
        sched.alphas_cumprod.fill_(ab)
        sched.sqrt_alphas_cumprod.fill_(ab ** 0.5)
        sched.sqrt_one_minus_alphas_cumprod.fill_((1 - ab) ** 0.5)
        model.zero_grad()
        loss, logs = model(batch, torch.Generator().manual_seed(0))
        loss.backward()
        # the value is the x0 MSE alone; the likelihood only adds its gradient
        assert float(loss) == float(logs["loss"])
        grad = model.x0_skip.log_var_scaled.grad
        moved = grad is not None and float(grad.abs().sum()) > 0
        assert moved == noisy and torch.isfinite(logs["x0_skip_nll"])
        assert model.model.final_conv[1].weight.grad is not None


def test_the_spectral_skip_has_a_spectrum_per_level_and_its_own_layout():
    white = build_model(tiny_config(overrides=["model.x0_skip=gaussian"]))
    spectral = build_model(tiny_config(overrides=["model.x0_skip=gaussian_spectral"]))
    g = spectral.cfg.generated_channels
    assert tuple(spectral.state_dict()[KEY].shape) == (g, 16) and tuple(white.state_dict()[KEY].shape) == (g,)
    with pytest.raises(RuntimeError, match=KEY):
        spectral.load_state_dict(white.state_dict(), strict=True)
