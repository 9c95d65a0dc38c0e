"""The ConvNeXt U-Net denoiser with linear attention (docs/model.md#u-net-layout), quirks included.

Quirks kept on purpose, because they fix parameter names and shapes of reference checkpoints:
the first block has no LayerNorm, the final block has no time MLP (but has FiLM), the
full-resolution skip s0 is pushed and never consumed, there are 3 up stages for 4 down stages,
and the decoder concatenates [running, skip] in that order.
"""

from __future__ import annotations

import torch
from torch import nn

from depthdif_hpc.kernels.dispatch import KERNEL_MODES
from depthdif_hpc.model.embeddings import SinusoidalTimeEmbedding
from depthdif_hpc.model.layers import (
    ConvNextBlock,
    Downsample,
    LinearAttention,
    PreNorm,
    Residual,
    Upsample,
)


def _attn(dim: int) -> Residual:
    return Residual(PreNorm(dim, LinearAttention(dim)))


class UNet(nn.Module):
    def __init__(
        self,
        dim: int,
        out_dim: int,
        dim_mults: tuple[int, ...] | list[int] = (1, 2, 4, 8),
        channels: int = 102,
        with_time_emb: bool = True,
        coord_emb_dim: int | None = None,
        output_mean_scale: bool = False,
        residual: bool = False,
    ) -> None:
        super().__init__()
        if residual and channels != out_dim:
            raise ValueError(
                f"residual=True adds the {channels}-channel input to the {out_dim}-channel output; "
                "the counts must match"
            )
        self.channels = channels
        self.out_dim = out_dim
        self.output_mean_scale = output_mean_scale
        self.residual = residual
        self.num_downsamples = len(dim_mults) - 1
        dims = [channels, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))

        time_dim = dim if with_time_emb else None
        self.time_mlp = (
            nn.Sequential(
                SinusoidalTimeEmbedding(dim), nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim)
            )
            if with_time_emb
            else None
        )
        blk = dict(time_emb_dim=time_dim, coord_emb_dim=coord_emb_dim)

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            self.downs.append(
                nn.ModuleList(
                    [
                        ConvNextBlock(d_in, d_out, norm=i != 0, **blk),
                        ConvNextBlock(d_out, d_out, **blk),
                        _attn(d_out),
                        Downsample(d_out) if not last else nn.Identity(),
                    ]
                )
            )
        mid = dims[-1]
        self.mid_block1 = ConvNextBlock(mid, mid, **blk)
        self.mid_attn = _attn(mid)
        self.mid_block2 = ConvNextBlock(mid, mid, **blk)

        self.ups = nn.ModuleList()
        for d_in, d_out in reversed(in_out[1:]):
            self.ups.append(
                nn.ModuleList(
                    [
                        ConvNextBlock(d_out * 2, d_in, **blk),
                        ConvNextBlock(d_in, d_in, **blk),
                        _attn(d_in),
                        Upsample(d_in),
                    ]
                )
            )
        self.final_conv = nn.Sequential(
            ConvNextBlock(dim, dim, coord_emb_dim=coord_emb_dim), nn.Conv2d(dim, out_dim, 1)
        )

    def set_kernels(self, mode: str) -> None:
        """How ConvNeXt fronts and linear attention run: "eager", "triton" or "auto".

        See `depthdif_hpc.kernels.dispatch`: "triton" self-checks each kernel before its first
        use and raises if it fails; "auto" does the same on CUDA but falls back to the eager
        reference with a warning, and is eager elsewhere.
        """
        if mode not in KERNEL_MODES:
            raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
        for m in self.modules():
            if hasattr(m, "kernel_mode"):
                m.kernel_mode = mode

    def forward(
        self, x: torch.Tensor, time: torch.Tensor, c_emb: torch.Tensor | None = None
    ) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"UNet expects (B, {self.channels}, H, W) = [noisy target | condition], "
                f"got {tuple(x.shape)}"
            )
        factor = 2**self.num_downsamples
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(
                f"UNet input H, W = {tuple(x.shape[-2:])} must be divisible by {factor} "
                f"({self.num_downsamples} downsamplings)"
            )
        orig = x
        t = self.time_mlp(time) if self.time_mlp is not None else None
        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, t, c_emb)
            x = block2(x, t, c_emb)
            x = attn(x)
            skips.append(x)
            x = down(x)
        x = self.mid_block1(x, t, c_emb)
        x = self.mid_attn(x)
        x = self.mid_block2(x, t, c_emb)
        for block1, block2, attn, up in self.ups:
            x = torch.cat((x, skips.pop()), dim=1)
            x = block1(x, t, c_emb)
            x = block2(x, t, c_emb)
            x = attn(x)
            x = up(x)
        # skips[0] (full resolution) is left unused, as in the reference.
        out = self.final_conv[1](self.final_conv[0](x, None, c_emb))
        if self.output_mean_scale:
            out_mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = out - orig.mean(dim=(1, 2, 3), keepdim=True) + out_mean
        if self.residual:
            out = out + orig
        return out
