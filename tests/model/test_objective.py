"""DepthDif's training objective: prepare (standard and ambient condition, target and loss
support), the p_loss by hand, required inputs, gradients reaching every parameter."""

import pytest
import torch

from depthdif_hpc import build_model
from depthdif_hpc.diffusion.masks import masked_mse
from tests.helpers import random_batch, tiny_config


def test_ambient_prepare_builds_condition_from_x_times_kept():
    cfg = tiny_config(ambient=True, overrides=["model.ambient_occlusion.further_drop_prob=0.5"])
    model = build_model(cfg)
    batch = random_batch(obs_frac=0.3)
    p = model.prepare(batch, further_drop=True, generator=torch.Generator().manual_seed(0))
    a = batch["x_valid_mask"].float()
    assert torch.all(p.cond_mask <= a) and p.cond_mask.sum() < a.sum()
    torch.testing.assert_close(p.cond[:, 1:51], batch["x"] * p.cond_mask)
    torch.testing.assert_close(p.cond[:, 51:], p.cond_mask.amax(1, keepdim=True))
    torch.testing.assert_close(p.target, batch["x"])
    # loss support is the ORIGINAL A n Y (times land), not A~
    ref = a * batch["y_valid_mask"].float() * batch["land_mask"]
    torch.testing.assert_close(p.loss_mask, ref)
    assert torch.equal(p.noisy_mask, p.cond_mask)


def test_standard_prepare():
    model = build_model(tiny_config())
    batch = random_batch()
    p = model.prepare(batch, further_drop=True)
    torch.testing.assert_close(p.target, batch["y"])
    torch.testing.assert_close(p.cond[:, 1:51], batch["x"])
    torch.testing.assert_close(p.loss_mask, batch["y_valid_mask"].float() * batch["land_mask"])
    assert p.noisy_mask is None


class _Recorder(torch.nn.Module):
    """Stands in for the U-Net: records its input and returns a fixed prediction."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out
        self.inputs = []

    def forward(self, x, t, c):
        self.inputs.append((x.clone(), t.clone()))
        return self.out


def test_p_loss_by_hand_ambient_masks_noisy_branch():
    cfg = tiny_config(ambient=True, overrides=["model.ambient_occlusion.further_drop_prob=0.5"])
    model = build_model(cfg)
    batch = random_batch(obs_frac=0.3)
    pred = torch.randn(2, 50, 16, 16)
    model.model = _Recorder(pred)
    g1 = torch.Generator().manual_seed(11)
    loss, logs = model.loss(batch, generator=g1)
    # replay the same random stream by hand
    g2 = torch.Generator().manual_seed(11)
    p = model.prepare(batch, further_drop=True, generator=g2)
    t = torch.randint(0, 20, (2,), generator=g2)
    eps = torch.randn(2, 50, 16, 16, generator=g2)
    xt = model.schedule.q_sample(batch["x"], t, eps) * p.cond_mask
    inp, t_seen = model.model.inputs[0]
    assert torch.equal(t_seen, t)
    torch.testing.assert_close(inp[:, :50], xt)
    assert torch.all(inp[:, :50][p.cond_mask == 0] == 0)
    ref = masked_mse(pred, batch["x"], p.loss_mask)
    torch.testing.assert_close(loss, ref)
    assert set(logs) >= {"loss", "masked_fraction", "ambient_dropped_fraction"}


def test_p_loss_epsilon_target_and_unmasked():
    cfg = tiny_config(overrides=["model.parameterization=EPS", "model.mask_loss_with_valid_pixels=false"])
    model = build_model(cfg)
    assert model.parameterization == "epsilon"
    batch = random_batch()
    pred = torch.randn(2, 50, 16, 16)
    model.model = _Recorder(pred)
    loss, _ = model.loss(batch, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    torch.randint(0, 20, (2,), generator=g)
    eps = torch.randn(2, 50, 16, 16, generator=g)
    torch.testing.assert_close(loss, ((pred - eps) ** 2).mean())


def test_missing_coords_is_an_error():
    model = build_model(tiny_config())
    batch = random_batch()
    del batch["coords"]
    with pytest.raises(ValueError, match="coords"):
        model.loss(batch)


def test_loss_backward_reaches_all_parameters():
    model = build_model(tiny_config())
    loss, _ = model.loss(random_batch(), generator=torch.Generator().manual_seed(0))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
