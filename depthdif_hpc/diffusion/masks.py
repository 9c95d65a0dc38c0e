"""Mask binarisation/alignment (docs/model.md#mask-handling) and the masked MSE
(docs/model.md#masked-mse)."""

from __future__ import annotations

import torch


def binarize(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (mask.float() > 0.5).to(dtype)


def align_mask(mask: torch.Tensor, channels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Binarize and bring a mask to `channels` channels.

    (B,H,W) gains a channel axis; 1 channel broadcasts to C; C channels collapse to 1 by max
    (logical OR) when 1 is asked for. Any other mismatch is an error.
    """
    m = binarize(mask, dtype)
    if m.ndim == 3:
        m = m.unsqueeze(1)
    if m.ndim != 4:
        raise ValueError(f"mask must be (B,H,W) or (B,C,H,W), got shape {tuple(mask.shape)}")
    c = m.shape[1]
    if c == channels:
        return m
    if c == 1:
        return m.expand(-1, channels, -1, -1)
    if channels == 1:
        return m.amax(dim=1, keepdim=True)
    raise ValueError(f"cannot align a {c}-channel mask to {channels} channels")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sum(M (target - pred)^2) / sum(M), 0 for an empty mask; plain mean MSE without a mask.

    No host synchronisation: the empty case is handled with clamp/where on the device.
    """
    err = (target.float() - pred.float()) ** 2
    if mask is None:
        return err.mean()
    m = mask.to(err.dtype).expand_as(err)
    total = m.sum()
    return torch.where(total > 0, (err * m).sum() / total.clamp_min(1.0), torch.zeros_like(total))
