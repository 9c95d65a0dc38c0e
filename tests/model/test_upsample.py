"""U-Net upsampling modes (docs/model.md#checkerboard): the research ConvTranspose2d(4, stride 2)
gives its four output phases different filters; nearest_conv gives every pixel the same one."""

from __future__ import annotations

import pytest
import torch

from depthdif_hpc.config import load_config
from depthdif_hpc.model.layers import Upsample
from depthdif_hpc.model.unet import UNet


def _phase_spread(mode: str) -> float:
    """Relative spread of the 4 output phases' means on a constant input (interior only)."""
    torch.manual_seed(0)
    up = Upsample(8, mode)
    with torch.no_grad():
        out = up(torch.ones(1, 8, 16, 16))[0, :, 4:-4, 4:-4]
    phases = torch.stack([out[:, i::2, j::2].mean(dim=(1, 2)) for i in range(2) for j in range(2)])
    return float((phases.std(0) / phases.abs().mean(0)).max())


def test_transposed_upsampling_prints_a_checkerboard_and_nearest_conv_does_not():
    assert _phase_spread("transposed") > 0.05
    assert _phase_spread("nearest_conv") < 1e-6


def test_nearest_conv_unet_runs_and_keeps_the_research_layout_elsewhere():
    kw = dict(dim=8, out_dim=3, dim_mults=(1, 2), channels=5)
    ref, new = UNet(**kw), UNet(**kw, upsample="nearest_conv")
    out = new(torch.randn(2, 5, 16, 16), torch.tensor([3, 7]))
    assert out.shape == (2, 3, 16, 16)
    ref_keys, new_keys = set(ref.state_dict()), set(new.state_dict())
    assert {k for k in ref_keys - new_keys} == {"ups.0.3.weight", "ups.0.3.bias"}
    assert {k for k in new_keys - ref_keys} == {"ups.0.3.1.weight", "ups.0.3.1.bias"}
    with pytest.raises(RuntimeError, match="ups.0.3"):
        new.load_state_dict(ref.state_dict())


def test_upsample_mode_is_checked():
    with pytest.raises(ValueError, match="bilinear"):
        Upsample(4, "bilinear")
    with pytest.raises(Exception, match="model.unet.upsample"):
        load_config(overrides=["model.unet.upsample=bilinear"])
