"""Timestep embedding and the coordinate/date encodings used for FiLM (docs/model.md#embeddings)."""

from __future__ import annotations

import math

import torch
from torch import nn

COORD_ENCODING_DIMS = {"unit_sphere": 3, "sincos": 4, "raw": 2}
DATE_ENCODING_DIMS = {"day_of_year_sincos": 2}


class SinusoidalTimeEmbedding(nn.Module):
    """[sin(t w_k), cos(t w_k)], w_k = exp(-k ln(10000) / (half - 1)); t is the raw step."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 or dim < 4:
            raise ValueError(f"time embedding dim must be even and >= 4, got {dim}")
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(
            torch.arange(half, device=t.device, dtype=torch.float32) * (-math.log(10000.0) / (half - 1))
        )
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat((args.sin(), args.cos()), dim=-1)


def encode_coords(coords: torch.Tensor, encoding: str) -> torch.Tensor:
    """coords (B, 2) = [lat, lon] in degrees -> (B, k) features."""
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"coords must have shape (B, 2) = [lat, lon], got {tuple(coords.shape)}")
    coords = coords.float()
    lat, lon = coords[:, 0], coords[:, 1]
    phi, lam = torch.deg2rad(lat), torch.deg2rad(lon)
    if encoding == "unit_sphere":
        feats = (phi.cos() * lam.cos(), phi.cos() * lam.sin(), phi.sin())
    elif encoding == "sincos":
        feats = (phi.sin(), phi.cos(), lam.sin(), lam.cos())
    elif encoding == "raw":
        feats = (lat / 90.0, lon / 180.0)
    else:
        raise ValueError(f"unknown coord encoding {encoding!r}; expected {sorted(COORD_ENCODING_DIMS)}")
    return torch.stack(feats, dim=-1)


def day_of_year(date: torch.Tensor) -> torch.Tensor:
    """YYYYMMDD integers (B,) -> non-leap day of year 1..365; invalid dates raise (Feb 29 is
    mapped to Feb 28 upstream, docs/model.md#batch-contract).

    On an accelerator the check is a device-side assert, so the training step does not wait for
    the host; on CPU it raises with the offending date.
    """
    date = date.long()
    month = (date // 100) % 100
    day = date % 100
    # The calendar by arithmetic, not by a table: a table made on the device at each call is a
    # blocking host-to-device copy, and two of them per training step made the host wait for
    # the device's queue to drain. Month lengths 30 + (m + m // 8) % 2, February 28; days
    # before month m: 275 m // 9 - 2 (m + 9) // 12 - 30 (the common-year day-of-year formula).
    m = month.clamp(1, 12)
    month_days = 30 + (m + m // 8) % 2 - 2 * (m == 2).long()
    valid = (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days)
    if date.device.type == "cpu":
        if not bool(valid.all()):
            bad = date[~valid][0].item()
            raise ValueError(f"date {bad} is not a valid YYYYMMDD (non-leap calendar)")
    else:
        torch._assert_async(valid.all(), "date is not a valid YYYYMMDD (non-leap calendar)")
    return 275 * m // 9 - 2 * ((m + 9) // 12) - 30 + day


def encode_date(date: torch.Tensor, encoding: str = "day_of_year_sincos") -> torch.Tensor:
    if encoding != "day_of_year_sincos":
        raise ValueError(f"unknown date encoding {encoding!r}; expected {sorted(DATE_ENCODING_DIMS)}")
    theta = 2.0 * math.pi * day_of_year(date).float() / 365.0
    return torch.stack((theta.sin(), theta.cos()), dim=-1)


class CoordDateEncoder(nn.Module):
    """enc(coords[, date]) -> Linear(4E) -> GELU -> Linear(E): the per-sample FiLM embedding."""

    def __init__(self, embed_dim: int, encoding: str = "unit_sphere", include_date: bool = True,
                 date_encoding: str = "day_of_year_sincos") -> None:
        super().__init__()
        if encoding not in COORD_ENCODING_DIMS:
            raise ValueError(f"unknown coord encoding {encoding!r}")
        self.encoding = encoding
        self.include_date = include_date
        self.date_encoding = date_encoding
        in_dim = COORD_ENCODING_DIMS[encoding] + (DATE_ENCODING_DIMS[date_encoding] if include_date else 0)
        self.net = nn.Sequential(nn.Linear(in_dim, 4 * embed_dim), nn.GELU(), nn.Linear(4 * embed_dim, embed_dim))

    def forward(self, coords: torch.Tensor | None, date: torch.Tensor | None) -> torch.Tensor:
        if coords is None:
            raise ValueError("coordinate conditioning is enabled but the batch has no 'coords'")
        feats = [encode_coords(coords, self.encoding)]
        if self.include_date:
            if date is None:
                raise ValueError("date conditioning is enabled but the batch has no 'date'")
            feats.append(encode_date(date, self.date_encoding).to(feats[0].device))
        enc = torch.cat(feats, dim=-1).to(self.net[0].weight.dtype)
        return self.net(enc)
