"""The analytic FLOP count (depthdif_hpc.model.flops) against hand counts and torch's counter."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from depthdif_hpc.model.flops import (
    PEAK_FLOPS,
    mfu,
    model_forward_flops,
    module_forward_flops,
    peak_flops,
    train_step_flops_per_sample,
    unet_forward_flops,
)
from depthdif_hpc.model.layers import ConvNextBlock, LinearAttention, PreNorm, Residual
from depthdif_hpc.model.unet import UNet
from tests.helpers import tiny_config


# Hand counts (2 FLOPs per multiply-add; biases and elementwise work excluded).
def conv(c_in: int, c_out: int, k: int, hw: int) -> int:
    return 2 * c_in * c_out * k * k * hw


def dwconv7(c: int, hw: int) -> int:
    return 2 * 49 * c * hw


def lin(n_in: int, n_out: int) -> int:
    return 2 * n_in * n_out


def attention(dim: int, hw: int, heads: int = 4, d: int = 32) -> int:
    hidden = heads * d
    qkv = conv(dim, 3 * hidden, 1, hw)
    core = 2 * (2 * heads * d * d * hw)  # ctx = softmax(k) v^T, out = ctx^T q
    return qkv + core + conv(hidden, dim, 1, hw)


def block(c_in: int, c_out: int, hw: int, t_dim: int | None, e_dim: int | None, mult: int = 2) -> int:
    f = dwconv7(c_in, hw) + conv(c_in, c_out * mult, 3, hw) + conv(c_out * mult, c_out, 3, hw)
    f += conv(c_in, c_out, 1, hw) if c_in != c_out else 0
    f += lin(t_dim, c_in) if t_dim else 0
    f += lin(e_dim, 2 * c_in) if e_dim else 0
    return f


def test_conv2d_and_linear():
    assert module_forward_flops(nn.Conv2d(8, 16, 3, padding=1), (1, 8, 10, 12)) == conv(8, 16, 3, 120)
    # stride 2, 4x4, padding 1 (the U-Net's Downsample): 10x12 -> 5x6
    assert module_forward_flops(nn.Conv2d(8, 8, 4, 2, 1), (2, 8, 10, 12)) == 2 * conv(8, 8, 4, 30)
    assert module_forward_flops(nn.Linear(5, 7), (3, 5)) == 3 * lin(5, 7)
    # ConvTranspose2d(4, 2, 1): every input pixel feeds a 4x4 patch of every output channel
    up = nn.ConvTranspose2d(6, 6, 4, 2, 1)
    assert module_forward_flops(up, (1, 6, 5, 7)) == 2 * 6 * 6 * 16 * 35


def test_depthwise_conv_counts_groups():
    dw = nn.Conv2d(24, 24, 7, padding=3, groups=24)
    assert module_forward_flops(dw, (1, 24, 9, 11)) == dwconv7(24, 99)


@pytest.mark.parametrize("mode", ["eager", "triton"])
def test_convnext_block(mode):
    b = ConvNextBlock(8, 16, time_emb_dim=12, coord_emb_dim=10)
    b.kernel_mode = mode  # same count whichever front runs: the count is from shapes
    got = module_forward_flops(b, (1, 8, 6, 5), (1, 12), (1, 10))
    assert got == block(8, 16, 30, 12, 10)
    assert b.kernel_mode == mode  # restored


def test_depthwise_conv_counted_once_when_called_as_module():
    class Eager(ConvNextBlock):
        def forward(self, x, t_emb=None, c_emb=None):
            return self.net[1:](self.ds_conv(x)) + self.res_conv(x)

    got = module_forward_flops(Eager(8, 8), (1, 8, 4, 4))
    assert got == dwconv7(8, 16) + conv(8, 16, 3, 16) + conv(16, 8, 3, 16)


def test_linear_attention_block():
    attn = Residual(PreNorm(16, LinearAttention(16)))
    assert module_forward_flops(attn, (1, 16, 4, 6)) == attention(16, 24)
    # per-sample count scales with the batch
    assert module_forward_flops(attn, (3, 16, 4, 6)) == 3 * attention(16, 24)


def test_tiny_unet_equals_sum_of_hand_counted_parts():
    u = UNet(dim=8, out_dim=3, dim_mults=(1, 2), channels=5, coord_emb_dim=6)
    hw0, hw1 = 8 * 8, 4 * 4
    t = 8  # time embedding width = dim
    expected = lin(8, 32) + lin(32, 8)  # time MLP
    # down 0 at 8x8, then a 4x4 stride-2 conv to 4x4
    expected += block(5, 8, hw0, t, 6) + block(8, 8, hw0, t, 6) + attention(8, hw0)
    expected += conv(8, 8, 4, hw1)
    # down 1 at 4x4 (last: no downsampling)
    expected += block(8, 16, hw1, t, 6) + block(16, 16, hw1, t, 6) + attention(16, hw1)
    # middle at 4x4
    expected += 2 * block(16, 16, hw1, t, 6) + attention(16, hw1)
    # one up stage at 4x4: [x | skip] = 32 channels, then a transposed conv to 8x8
    expected += block(32, 8, hw1, t, 6) + block(8, 8, hw1, t, 6) + attention(8, hw1)
    expected += 2 * 8 * 8 * 16 * hw1
    # final block (FiLM, no time MLP) and the 1x1 output conv at 8x8
    expected += block(8, 8, hw0, None, 6) + conv(8, 3, 1, hw0)
    assert unet_forward_flops(u, 8, 8) == expected
    # resolution matters per level: twice the side is 4x the FLOPs (every layer is per pixel,
    # apart from the per-sample MLPs)
    mlps = lin(8, 32) + lin(32, 8) + sum(
        lin(t, m.mlp[-1].out_features) + lin(6, m.coord_mlp[-1].out_features)
        for m in u.modules() if isinstance(m, ConvNextBlock) and m.mlp is not None
    ) + lin(6, 16)
    assert unet_forward_flops(u, 16, 16) - mlps == 4 * (expected - mlps)


def test_whole_model_adds_the_coordinate_mlp_and_train_step_is_3x():
    torch.manual_seed(0)
    from depthdif_hpc.model.build import build_model

    model = build_model(tiny_config(ambient=True))
    e = model.coord_mlp.net[-1].out_features
    coord = lin(model.coord_mlp.net[0].in_features, 4 * e) + lin(4 * e, e)
    u = unet_forward_flops(model.model, 16, 16)
    assert model_forward_flops(model, 16, 16) == u + coord
    assert train_step_flops_per_sample(model, 16, 16) == 3 * (u + coord)
    model.model.set_kernels("triton")  # the Triton route has the same count (bench_train's modes)
    assert train_step_flops_per_sample(model, 16, 16) == 3 * (u + coord)
    # parameters stay where they were (the count runs on meta stand-ins)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_latent_model_counts_frozen_encoder_forward_only():
    from depthdif_hpc.model.autoencoder import DepthBandAutoencoder

    class Latent(nn.Module):  # the attributes LatentDepthDif exposes
        def __init__(self):
            super().__init__()
            self.model = UNet(8, 4, dim_mults=(1, 2), channels=9, coord_emb_dim=None)
            self.autoencoder = DepthBandAutoencoder(6, 4, (8,), (8,), spatial_downsample=2)
            self.coord_mlp = None

    m = Latent()
    enc = conv(6, 8, 3, 16) + conv(8, 4, 1, 16)  # stride-2 3x3 to 4x4, then 1x1 to the latent
    u = unet_forward_flops(m.model, 4, 4)
    assert train_step_flops_per_sample(m, 8, 8) == 3 * u + 3 * 2 * enc
    m.autoencoder.requires_grad_(False)
    assert model_forward_flops(m, 8, 8) == u + 2 * enc
    assert train_step_flops_per_sample(m, 8, 8) == 3 * u + 2 * enc


def test_unknown_parameterised_layer_is_refused():
    with pytest.raises(NotImplementedError, match="Conv1d"):
        module_forward_flops(nn.Sequential(nn.Conv1d(2, 2, 3)), (1, 2, 8))


def _torch_count(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(8, 16, 3, padding=1), (2, 8, 10, 12)),
    (nn.Conv2d(8, 8, 4, 2, 1), (2, 8, 10, 12)),
    (nn.Linear(24, 40), (6, 24)),
])
def test_agrees_with_torch_counter_on_plain_layers(layer, shape):
    x = torch.randn(shape, requires_grad=True)
    ours = module_forward_flops(layer, shape)
    assert _torch_count(lambda: layer(x)) == ours
    # forward + backward (dgrad + wgrad): torch's counter is right here, and equals the 3x rule
    assert _torch_count(lambda: layer(x).sum().backward()) == 3 * ours


def test_depthwise_backward_where_torch_counter_overcounts():
    c, h, w = 32, 16, 16
    dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
    x = torch.randn(1, c, h, w, requires_grad=True)
    ours = module_forward_flops(dw, (1, c, h, w))
    # backward by hand: dx is a depthwise (transposed) 7x7 over the same pixels, dw sums
    # x * dy over them: 2 * 49 * C * H * W each, i.e. 2x the forward (the 3x rule)
    assert ours == dwconv7(c, h * w)
    bwd_by_hand = 2 * dwconv7(c, h * w)
    assert _torch_count(lambda: dw(x)) == ours  # torch's forward handles groups
    torch_bwd = _torch_count(lambda: dw(x).sum().backward()) - ours
    # torch counts dx as a dense conv (ignores groups): (C + 1) / 2 times the true backward
    assert torch_bwd >= c / 2 * bwd_by_hand, (torch_bwd, bwd_by_hand)


def test_peak_flops_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4e12
    assert peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert peak_flops("NVIDIA H200", torch.bfloat16) == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "tf32") == 494.7e12
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.float32) == 66.9e12
    assert peak_flops("NVIDIA A100-PCIE-40GB", torch.float32) == 19.5e12
    assert peak_flops("Tesla T4", torch.bfloat16) is None
    assert peak_flops("NVIDIA H100 80GB HBM3", torch.int8) is None
    for gpu in PEAK_FLOPS.values():  # TF32 is half the bf16 tensor-core rate on these parts
        assert gpu["tf32"] == pytest.approx(gpu["bf16"] / 2, rel=1e-3)
    assert mfu(100.0, 4_947_000_000_000, "NVIDIA H200", torch.bfloat16) == pytest.approx(0.5)
    assert mfu(100.0, 10**12, "cpu", torch.float32) is None
