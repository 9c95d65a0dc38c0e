"""Condition assembly (docs/model.md#condition-assembly): [eo | data | any-depth validity mask], in
that order."""

from __future__ import annotations

import torch

from depthdif_hpc.diffusion.masks import align_mask


def build_condition(
    data: torch.Tensor,
    valid_mask: torch.Tensor | None,
    eo: torch.Tensor | None,
    *,
    include_eo: bool,
    use_valid_mask: bool,
    mask_channels: int,
    expected_channels: int,
) -> torch.Tensor:
    """Concatenate the condition and check its channel count against the config.

    `data` is x (standard) or x * A~ (ambient); `valid_mask` is A or A~.
    """
    parts: list[torch.Tensor] = []
    sources: list[str] = []
    if include_eo:
        if eo is None:
            raise ValueError("model.condition_include_eo is true but the batch has no 'eo'")
        if eo.ndim == 3:
            eo = eo.unsqueeze(1)
        parts.append(eo.to(data.dtype))
        sources.append(f"eo ({eo.shape[1]})")
    parts.append(data)
    sources.append(f"x ({data.shape[1]})")
    if use_valid_mask:
        if valid_mask is None:
            raise ValueError("model.condition_use_valid_mask is true but no x_valid_mask was given")
        m = align_mask(valid_mask, mask_channels, data.dtype)
        parts.append(m)
        sources.append(f"x_valid_mask ({m.shape[1]})")
    cond = torch.cat(parts, dim=1)
    if cond.shape[1] != expected_channels:
        raise ValueError(
            f"condition has {cond.shape[1]} channels but model.condition_channels = "
            f"{expected_channels}; built from {' + '.join(sources)}"
        )
    return cond
