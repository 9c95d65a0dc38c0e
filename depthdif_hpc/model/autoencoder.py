"""Depth-band autoencoder of the latent workflow (docs/model.md#latent-workflow).

It compresses the 50 depth bands of a temperature field to a few latent channels per pixel
(optionally also downsampling space by a power of two). Layers are 3x3 conv + GELU, with 1x1
convs into and out of the latent and a linear 3x3 conv back to the bands. The loss is L1 + L2 reconstruction, optionally only over valid
pixels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from depthdif_hpc.diffusion.masks import align_mask


def _conv_gelu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GELU())


class DepthBandAutoencoder(nn.Module):
    def __init__(
        self,
        in_channels: int = 50,
        latent_channels: int = 12,
        encoder_channels: tuple[int, ...] | list[int] = (64, 96, 128),
        decoder_channels: tuple[int, ...] | list[int] = (128, 96, 64),
        spatial_downsample: int = 1,
    ) -> None:
        super().__init__()
        if spatial_downsample < 1 or spatial_downsample & (spatial_downsample - 1):
            raise ValueError(f"spatial_downsample must be a power of two >= 1, got {spatial_downsample}")
        n_down = int(math.log2(spatial_downsample))
        if n_down > len(encoder_channels):
            raise ValueError(f"spatial_downsample {spatial_downsample} needs at least {n_down} encoder layers")
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.spatial_downsample = spatial_downsample
        enc: list[nn.Module] = []
        c = in_channels
        for i, width in enumerate(encoder_channels):
            # the last n_down layers halve the resolution (stride 2)
            enc.append(_conv_gelu(c, width, stride=2 if i >= len(encoder_channels) - n_down else 1))
            c = width
        enc.append(nn.Conv2d(c, latent_channels, 1))
        self.encoder = nn.Sequential(*enc)
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, decoder_channels[0], 1), nn.GELU()]
        widths = [*decoder_channels[1:], in_channels]
        if n_down > len(widths):
            raise ValueError(f"spatial_downsample {spatial_downsample} needs at least {n_down - 1} "
                             "decoder layers after the first")
        c = decoder_channels[0]
        for i, width in enumerate(widths):
            if i < n_down:
                dec.append(nn.Upsample(scale_factor=2, mode="nearest"))
            last = i == len(widths) - 1
            # the output layer is linear: temperatures are z-scores of either sign
            dec.append(nn.Conv2d(c, width, 3, padding=1) if last else _conv_gelu(c, width))
            c = width
        self.decoder = nn.Sequential(*dec)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"autoencoder expects (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        f = self.spatial_downsample
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"H, W = {tuple(x.shape[-2:])} must be divisible by spatial_downsample {f}")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decoder expects (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                        l1_weight: float = 1.0, l2_weight: float = 0.5) -> torch.Tensor:
    """w1 * mean|r - t| + w2 * mean (r - t)^2, over valid pixels when a mask is given (0 if none)."""
    diff = recon.float() - target.float()
    if valid is None:
        return l1_weight * diff.abs().mean() + l2_weight * diff.pow(2).mean()
    m = align_mask(valid, diff.shape[1])
    n = m.sum()
    l1 = (diff.abs() * m).sum() / n.clamp_min(1)
    l2 = (diff.pow(2) * m).sum() / n.clamp_min(1)
    return l1_weight * l1 + l2_weight * l2
