"""The ConvNeXt U-Net denoiser with linear attention (docs/model.md#u-net-layout), quirks included.

Quirks kept on purpose, because they fix parameter names and shapes of reference checkpoints:
the first block has no LayerNorm, the final block has no time MLP (but has FiLM), the
full-resolution skip s0 is pushed and never consumed, there are 3 up stages for 4 down stages,
and the decoder concatenates [running, skip] in that order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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


def inductor_settings() -> None:
    """Inductor's settings for the U-Net (process-wide): mix-order reduction off.

    On CUDA, inductor >= 2.10 fuses a norm's weight-gradient reduction (over B, H, W) with its
    input-gradient reduction (over C). For the ChannelLayerNorm gains, (1, C, 1, 1), it hands
    back a (C,) gradient: the H100 run of the eager U-Net compiled channels_last stopped at its
    first backward ("CompiledFunctionBackward returned an invalid gradient ... got [96] but
    expected shape compatible with [1, 96, 1, 1]", torch 2.11; pytorch/pytorch#178080), and the
    same pass computes wrong gradients silently for chained norms that share a parameter
    (#193061). The Triton kernels' own norms are custom ops it cannot fuse.
    """
    from torch._inductor import config as inductor_config

    inductor_config.triton.mix_order_reduction = False


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
        upsample: str = "transposed",
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
                        Upsample(d_in, upsample),
                    ]
                )
            )
        self.final_conv = nn.Sequential(
            ConvNextBlock(dim, dim, coord_emb_dim=coord_emb_dim), nn.Conv2d(dim, out_dim, 1)
        )
        self.levels = len(dim_mults)
        self.memory_format = torch.contiguous_format
        self.checkpoint_levels: frozenset[int] = frozenset()

    def set_channels_last(self, enabled: bool, *, weights: bool = True) -> None:
        """Activations (and with `weights` the convolution weights) in torch.channels_last (NHWC
        in memory), or everything contiguous NCHW.

        A convolution writes channels_last when its input or its weight is, so NHWC activations
        alone keep the format (the weight is then converted per call, a small copy); the forward
        re-asserts the format after every stage so that an op that returns NCHW (a reshape in
        the attention, a kernel that writes contiguous output) does not switch the rest back.
        """
        self.memory_format = torch.channels_last if enabled else torch.contiguous_format
        # Convolution weights only: the (1, C, 1, 1) LayerNorm parameters are the same bytes in
        # either format, but their gradients come back with NCHW strides, which DDP's bucket
        # views would flag and copy on every step.
        weight_format = self.memory_format if weights else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.weight.data = m.weight.data.to(memory_format=weight_format)

    def set_activation_checkpointing(self, levels: Iterable[int] | str) -> None:
        """Recompute the activations of these U-Net levels in the backward pass ("none", "all"
        or level indices: 0 is full resolution, `levels - 1` the bottleneck with the mid blocks).

        Each stage of a chosen level is one checkpointed segment (the down stage, the up stage,
        the mid blocks at the bottleneck level, the final block at level 0): only the segment's
        inputs are kept, everything inside is recomputed once during the backward pass.
        """
        if isinstance(levels, str):
            if levels not in ("none", "all"):
                raise ValueError(f"activation checkpointing: 'none', 'all' or level indices, got {levels!r}")
            chosen = set(range(self.levels)) if levels == "all" else set()
        else:
            chosen = {int(level) for level in levels}
        bad = sorted(level for level in chosen if not 0 <= level < self.levels)
        if bad:
            raise ValueError(f"activation checkpointing levels {bad}: this U-Net has levels "
                             f"0..{self.levels - 1}")
        self.checkpoint_levels = frozenset(chosen)

    def _stage(self, level: int, fn: Callable[..., Any], *args: Any) -> Any:
        if level in self.checkpoint_levels and torch.is_grad_enabled():
            # Non-reentrant: the segment's inputs need not require grad (the network input does
            # not) and it composes with torch.compile. The U-Net draws no random numbers, so the
            # recomputation reproduces the forward exactly.
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _format(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_format is torch.contiguous_format:
            return x  # today's path: formats as the ops return them
        return x.contiguous(memory_format=self.memory_format)

    def set_kernels(self, mode: str) -> None:
        """How ConvNeXt fronts, PreNorms and linear attention run: "eager", "triton" or "auto".

        See `depthdif_hpc.kernels.dispatch`: "triton" self-checks each kernel before its first
        use and raises if it fails; "auto" does the same on CUDA but falls back to the eager
        reference with a warning, and is eager elsewhere.
        """
        if mode not in KERNEL_MODES:
            raise ValueError(f"kernel mode must be one of {KERNEL_MODES}, got {mode!r}")
        for m in self.modules():
            if hasattr(m, "kernel_mode"):
                m.kernel_mode = mode

    def _time_embedding(self, time: torch.Tensor) -> torch.Tensor:
        # The sinusoid in fp32 (steps up to 1000: bf16 arguments would lose the phase), then the
        # MLP in its own dtype: a U-Net cast to bf16 stopped at the first Linear (fp32 input).
        sinusoid, *mlp = self.time_mlp
        t = sinusoid(time).to(mlp[0].weight.dtype)
        for layer in mlp:
            t = layer(t)
        return t

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """`nn.Module.compile`, under `inductor_settings` when the backend is inductor."""
        if kwargs.get("backend", "inductor") == "inductor":
            inductor_settings()
        super().compile(*args, **kwargs)

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
        x = self._format(x)
        t = self._time_embedding(time) if self.time_mlp is not None else None
        skips = []
        for level, stage in enumerate(self.downs):
            skip, x = self._stage(level, self._down, stage, x, t, c_emb)
            skips.append(skip)
        x = self._stage(self.levels - 1, self._mid, x, t, c_emb)
        for j, stage in enumerate(self.ups):
            x = self._stage(self.levels - 1 - j, self._up, stage, x, skips.pop(), t, c_emb)
        # skips[0] (full resolution) is left unused, as in the reference.
        out = self._stage(0, self._final, x, c_emb)
        if self.output_mean_scale:
            out_mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = out - orig.mean(dim=(1, 2, 3), keepdim=True) + out_mean
        if self.residual:
            out = out + orig
        return out

    # One stage each: the unit of activation checkpointing and of the memory-format re-assertion.

    def _down(self, stage: nn.ModuleList, x: torch.Tensor, t: torch.Tensor | None,
              c_emb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        block1, block2, attn, down = stage
        x = self._format(block2(self._format(block1(x, t, c_emb)), t, c_emb))
        skip = self._format(attn(x))
        return skip, self._format(down(skip))

    def _mid(self, x: torch.Tensor, t: torch.Tensor | None, c_emb: torch.Tensor | None) -> torch.Tensor:
        x = self._format(self.mid_block1(x, t, c_emb))
        x = self._format(self.mid_attn(x))
        return self._format(self.mid_block2(x, t, c_emb))

    def _up(self, stage: nn.ModuleList, x: torch.Tensor, skip: torch.Tensor, t: torch.Tensor | None,
            c_emb: torch.Tensor | None) -> torch.Tensor:
        block1, block2, attn, up = stage
        x = self._format(torch.cat((x, skip), dim=1))
        x = self._format(block2(self._format(block1(x, t, c_emb)), t, c_emb))
        return self._format(up(self._format(attn(x))))

    def _final(self, x: torch.Tensor, c_emb: torch.Tensor | None) -> torch.Tensor:
        return self.final_conv[1](self._format(self.final_conv[0](x, None, c_emb)))
