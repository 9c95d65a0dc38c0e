"""Conditioning, ambient occlusion and the p_loss objective on the DepthDif module."""

import pytest
import torch

from depthdif_hpc import build_model
from depthdif_hpc.diffusion.ambient import ambient_stats, further_keep_mask
from depthdif_hpc.diffusion.masks import masked_mse
from depthdif_hpc.model.conditioning import build_condition
from tests.helpers import random_batch, tiny_config


def test_condition_order_and_channels():
    b = random_batch()
    cond = build_condition(b["x"], b["x_valid_mask"], b["eo"], include_eo=True, use_valid_mask=True,
                           mask_channels=1, expected_channels=52)
    assert cond.shape == (2, 52, 16, 16)
    torch.testing.assert_close(cond[:, :1], b["eo"])
    torch.testing.assert_close(cond[:, 1:51], b["x"])
    torch.testing.assert_close(cond[:, 51:], b["x_valid_mask"].any(1, keepdim=True).float())


def test_single_band_condition():
    x = torch.randn(2, 1, 8, 8)
    cond = build_condition(x, None, None, include_eo=False, use_valid_mask=False, mask_channels=1,
                           expected_channels=1)
    assert torch.equal(cond, x)


def test_condition_channel_mismatch_names_sources():
    b = random_batch()
    with pytest.raises(ValueError) as err:
        build_condition(b["x"], b["x_valid_mask"], b["eo"], include_eo=True, use_valid_mask=True,
                        mask_channels=1, expected_channels=51)
    msg = str(err.value)
    assert "52 channels" in msg and "condition_channels = 51" in msg
    assert "eo (1) + x (50) + x_valid_mask (1)" in msg


def test_further_keep_mask_subset_and_shared_columns():
    b = random_batch(obs_frac=0.3)
    a = b["x_valid_mask"].float()
    g = torch.Generator().manual_seed(0)
    kept = further_keep_mask(a, 0.5, shared_spatial=True, min_kept=0, generator=g)
    assert torch.all(kept <= a)
    assert 0 < kept.sum() < a.sum()
    # shared spatial: a column is kept at all its observed depths or at none
    col_any = (kept > 0).any(1, keepdim=True)
    assert torch.equal(kept > 0, col_any & (a > 0))
    indep = further_keep_mask(a, 0.5, shared_spatial=False, min_kept=0, generator=g)
    assert torch.all(indep <= a)
    assert not torch.equal((indep > 0), (indep > 0).any(1, keepdim=True) & (a > 0))


def test_min_kept_guard_tops_up_exactly():
    a = torch.zeros(3, 4, 5, 5)
    a[0, :, 1, 1] = 1  # 4 observed elements
    a[1, :2, 2, 2] = 1  # 2 observed: n_min = min(3, 2) = 2
    # sample 2 has none: guard skipped
    for seed in range(5):
        kept = further_keep_mask(a, 0.999999, shared_spatial=True, min_kept=3,
                                 generator=torch.Generator().manual_seed(seed))
        assert torch.all(kept <= a)
        assert kept[0].sum() == 3 and kept[1].sum() == 2 and kept[2].sum() == 0
    # a guard that is already satisfied changes nothing
    kept = further_keep_mask(a, 0.0, shared_spatial=True, min_kept=3)
    assert torch.equal(kept, a)


def test_min_kept_guard_uniform_choice():
    a = torch.zeros(1, 1, 1, 6)
    a[..., :4] = 1
    counts = torch.zeros(6)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        counts += further_keep_mask(a, 0.9999999, min_kept=1, generator=g).flatten()
    assert counts[4:].sum() == 0 and counts.sum() == 400
    assert counts[:4].min() > 60  # each of the 4 observed elements picked about 100 times


def test_ambient_stats():
    a = torch.ones(1, 1, 2, 2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    s = ambient_stats(a, k)
    assert float(s["ambient_dropped_fraction"]) == pytest.approx(0.75)


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
