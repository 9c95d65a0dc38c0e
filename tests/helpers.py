"""Small builders shared by the foundation tests."""

from __future__ import annotations

import torch

from depthdif_hpc.config import Config, load_config

PRESET_STANDARD = "configs/px_space/model_config.yaml"
PRESET_AMBIENT = "configs/px_space/model_config_ambient.yaml"
TRAINING = "configs/px_space/training_config.yaml"


def tiny_config(*, ambient: bool = False, overrides: list[str] | None = None) -> Config:
    """A preset shrunk to a CPU-sized U-Net (50 depth levels kept)."""
    preset = PRESET_AMBIENT if ambient else PRESET_STANDARD
    return load_config(preset, TRAINING, overrides=[
        "model.unet.dim=8", "model.unet.dim_mults=[1,2]", "model.kernels=eager",
        "model.noise.num_timesteps=20", *(overrides or []),
    ])


def random_batch(b: int = 2, d: int = 50, h: int = 16, w: int = 16, seed: int = 0,
                 obs_frac: float = 0.05) -> dict[str, torch.Tensor]:
    """A batch with the contract of docs/model.md#batch-contract: sparse observed columns, a land
    strip, coords, dates."""
    g = torch.Generator().manual_seed(seed)
    # Low-rank structure (a few spatial modes times depth profiles), like a real ocean column.
    modes = torch.randn(b, 3, h, w, generator=g)
    profiles = torch.randn(3, d, generator=g).cumsum(1) / d**0.5
    y = torch.einsum("bkhw,kd->bdhw", modes, profiles)
    y_valid = torch.ones(b, d, h, w, dtype=torch.bool)
    y_valid[:, :, :, :2] = False  # land strip
    y_valid[:, d // 2:, :3, :] = False  # below the sea floor near the top edge
    y = y * y_valid
    cols = torch.rand(b, 1, h, w, generator=g) < obs_frac
    x_valid = cols.expand(b, d, h, w) & y_valid
    x_valid[:, -5:] = False  # floats stop above the deepest levels
    x = (y + 0.05 * torch.randn(b, d, h, w, generator=g)) * x_valid
    return {
        "eo": y[:, :1] + 0.1 * torch.randn(b, 1, h, w, generator=g),
        "x": x,
        "y": y,
        "x_valid_mask": x_valid,
        "y_valid_mask": y_valid,
        "land_mask": y_valid[:, :1].float(),
        "coords": torch.tensor([[35.0, -20.0], [-10.0, 170.0]])[:b] if b <= 2 else torch.zeros(b, 2),
        "date": torch.tensor([20180315, 20191231])[:b] if b <= 2 else torch.full((b,), 20180101),
        "sample_id": torch.arange(b, dtype=torch.int64),
    }
