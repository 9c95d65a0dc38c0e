"""The U-Net: parameter counts of the presets and of their parts, the reference layout's quirks,
output shapes, input checks, and the conditioning reaching the output."""

import pytest
import torch

from depthdif_hpc import build_model, load_config
from depthdif_hpc.model.embeddings import CoordDateEncoder
from depthdif_hpc.model.unet import UNet
from tests.helpers import PRESET_AMBIENT, PRESET_STANDARD, TRAINING


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("preset", "expected"), [(PRESET_AMBIENT, 128_078_480), (PRESET_STANDARD, 57_397_456)]
)
def test_preset_parameter_counts(preset, expected):
    model = build_model(load_config(preset, TRAINING))
    assert n_params(model) == expected


def test_unet_variant_counts():
    assert n_params(UNet(96, 50, channels=102, coord_emb_dim=None)) == 126_641_252
    unet32 = UNet(32, 50, channels=102, coord_emb_dim=32)
    assert n_params(unet32) + n_params(CoordDateEncoder(32)) == 14_706_448
    # per-part counts of docs/model.md#parameter-counts
    u = UNet(96, 50, channels=102, coord_emb_dim=96)
    assert n_params(u.time_mlp) == 74_208
    assert [n_params(d) for d in u.downs] == [949_086, 3_129_888, 12_121_152, 38_249_856]
    assert n_params(u.mid_block1) + n_params(u.mid_attn) + n_params(u.mid_block2) == 43_394_304
    assert [n_params(m) for m in u.ups] == [22_387_968, 5_811_840, 1_560_384]
    assert n_params(u.final_conv[0]) == 355_680


def test_reference_quirks():
    u = UNet(16, 50, channels=102, coord_emb_dim=16)
    first, final = u.downs[0][0], u.final_conv[0]
    assert isinstance(first.net[0], torch.nn.Identity)  # first block has no LayerNorm
    assert final.mlp is None and final.coord_mlp is not None  # final block: FiLM but no time MLP
    assert u.downs[0][2].fn.fn.to_qkv.bias is None  # bias-free qkv
    assert isinstance(u.downs[-1][3], torch.nn.Identity)  # last down stage does not downsample
    assert len(u.ups) == 3 and all(isinstance(m[3], torch.nn.ConvTranspose2d) for m in u.ups)


@pytest.mark.parametrize("preset", [PRESET_AMBIENT, PRESET_STANDARD])
def test_preset_output_shape_at_128(preset):
    model = build_model(load_config(preset, TRAINING)).eval()
    x = torch.randn(1, 102, 128, 128)
    with torch.no_grad():
        c = model.coord_mlp(torch.tensor([[10.0, 20.0]]), torch.tensor([20200101]))
        out = model.model(x, torch.tensor([5]), c)
    assert out.shape == (1, 50, 128, 128)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("hw", [(8, 8), (24, 40), (48, 16)])
def test_unet_other_sizes(hw):
    u = UNet(8, 3, dim_mults=(1, 2, 4, 8), channels=5, coord_emb_dim=8)
    out = u(torch.randn(3, 5, *hw), torch.tensor([0, 7, 999]), torch.randn(3, 8))
    assert out.shape == (3, 3, *hw)


@pytest.mark.parametrize("hw", [(20, 16), (16, 12), (130, 128)])
def test_unet_rejects_sizes_not_divisible_by_8(hw):
    u = UNet(8, 3, channels=5)
    with pytest.raises(ValueError, match="divisible by 8"):
        u(torch.randn(1, 5, *hw), torch.tensor([0]))


def test_unet_rejects_wrong_channels():
    u = UNet(8, 3, channels=5)
    with pytest.raises(ValueError, match=r"\(B, 5, H, W\)"):
        u(torch.randn(1, 6, 16, 16), torch.tensor([0]))


def test_film_and_time_reach_the_output():
    torch.manual_seed(0)
    u = UNet(8, 2, channels=3, coord_emb_dim=8).eval()
    x, t, c = torch.randn(2, 3, 16, 16), torch.tensor([3, 3]), torch.randn(2, 8)
    out = u(x, t, c)
    assert not torch.allclose(out, u(x, t, c * 2))
    assert not torch.allclose(out, u(x, torch.tensor([500, 500]), c))


def test_unet_cast_to_bf16_runs_in_bf16():
    """A U-Net cast to bf16 (parameters and input): the sinusoid is computed in fp32, for its
    phase, and handed to the time MLP in the MLP's dtype; it stopped at the MLP's first Linear
    before ("mat1 and mat2 must have the same dtype")."""
    torch.manual_seed(0)
    model = UNet(dim=8, out_dim=5, dim_mults=(1, 2), channels=102, coord_emb_dim=6)
    x, t, c = torch.randn(2, 102, 8, 8), torch.tensor([3, 999]), torch.randn(2, 6)
    ref = model(x, t, c)
    out = model.to(torch.bfloat16)(x.bfloat16(), t, c.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.05 * ref.abs().max()
