"""Building blocks of the ConvNeXt U-Net.

The ConvNeXt block front, the attention's PreNorm and the linear attention core run through
`depthdif_hpc.kernels.dispatch`: a Triton kernel or its eager reference, per the block's
`kernel_mode` (set by `UNet.set_kernels` from `model.kernels`). Attribute names follow
the research code's layout (`ds_conv`, `mlp`, `net`, `res_conv`, `to_qkv`, `to_out`, `fn`, `g`,
`b`) so that its state dicts map onto ours by prefix alone.
"""

from __future__ import annotations

import torch
from torch import nn

from depthdif_hpc.kernels.dispatch import run_op
from depthdif_hpc.kernels.layer_norm import layer_norm_reference

LN_EPS = 1e-5


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW tensor, biased variance, eps 1e-5."""

    def __init__(self, channels: int, eps: float = LN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.g = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.b = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_reference(x, self.g.view(-1), self.b.view(-1), self.eps)


class ConvNextBlock(nn.Module):
    """Depthwise 7x7 -> (+time bias) -> (FiLM) -> LN -> 3x3 -> GELU -> 3x3, plus a residual."""

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        time_emb_dim: int | None = None,
        coord_emb_dim: int | None = None,
        mult: int = 2,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(time_emb_dim, dim_in)) if time_emb_dim else None
        # FiLM: one Linear gives [scale | shift], scale first.
        self.coord_mlp = (
            nn.Sequential(nn.GELU(), nn.Linear(coord_emb_dim, 2 * dim_in)) if coord_emb_dim else None
        )
        self.ds_conv = nn.Conv2d(dim_in, dim_in, 7, padding=3, groups=dim_in)
        self.net = nn.Sequential(
            ChannelLayerNorm(dim_in) if norm else nn.Identity(),
            nn.Conv2d(dim_in, dim_out * mult, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(dim_out * mult, dim_out, 3, padding=1),
        )
        self.res_conv = nn.Conv2d(dim_in, dim_out, 1) if dim_in != dim_out else nn.Identity()
        self.kernel_mode = "eager"  # set by UNet.set_kernels

    def forward(
        self, x: torch.Tensor, t_emb: torch.Tensor | None = None, c_emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        time_bias = self.mlp(t_emb) if self.mlp is not None and t_emb is not None else None
        scale = shift = None
        if self.coord_mlp is not None:
            if c_emb is None:
                raise ValueError("this ConvNextBlock has FiLM conditioning but got no coord embedding")
            scale, shift = self.coord_mlp(c_emb).chunk(2, dim=1)
        norm = self.net[0]
        ln_w = norm.g.view(-1) if isinstance(norm, ChannelLayerNorm) else None
        ln_b = norm.b.view(-1) if isinstance(norm, ChannelLayerNorm) else None
        h = run_op("convnext_front", self.kernel_mode, x, self.ds_conv.weight, self.ds_conv.bias,
                   time_bias, scale, shift, ln_w, ln_b, norm.eps if ln_w is not None else LN_EPS)
        h = self.net[1:](h)
        return h + self.res_conv(x)


class LinearAttention(nn.Module):
    """Linear attention: softmax of k over space, none on q; 4 heads of 32 by default."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)
        self.kernel_mode = "eager"  # set by UNet.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (
            t.reshape(b, self.heads, self.dim_head, h * w) for t in self.to_qkv(x).chunk(3, dim=1)
        )
        out = run_op("linear_attention", self.kernel_mode, q, k, v, self.scale)
        return self.to_out(out.reshape(b, self.heads * self.dim_head, h, w))


class PreNorm(nn.Module):
    """fn(ChannelLayerNorm(x)); the norm runs as the `layer_norm` kernel op or its reference.

    The residual around it (Residual) adds x to the output of fn's final 1x1 convolution, not to
    the norm's output, so there is no add for the norm kernel to fuse.
    """

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(dim)
        self.kernel_mode = "eager"  # set by UNet.set_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm
        return self.fn(run_op("layer_norm", self.kernel_mode, x, n.g.view(-1), n.b.view(-1), n.eps))


class Residual(nn.Module):
    def __init__(self, fn: nn.Module) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x) + x


def Downsample(dim: int) -> nn.Conv2d:  # noqa: N802 - reads as a layer
    return nn.Conv2d(dim, dim, 4, 2, 1)


UPSAMPLE_MODES = ("transposed", "nearest_conv")


def Upsample(dim: int, mode: str = "transposed") -> nn.Module:  # noqa: N802
    """x2 upsampling. transposed: the research layout's ConvTranspose2d(4, stride 2), whose four
    output phases use different taps and so print a 2-pixel checkerboard on smooth fields
    (docs/model.md#checkerboard); nearest_conv: nearest-neighbour x2 then a 3x3 convolution, the
    same filter for every output pixel."""
    if mode == "transposed":
        return nn.ConvTranspose2d(dim, dim, 4, 2, 1)
    if mode == "nearest_conv":
        return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim, dim, 3, padding=1))
    raise ValueError(f"unknown upsample mode {mode!r}; expected one of {UPSAMPLE_MODES}")
