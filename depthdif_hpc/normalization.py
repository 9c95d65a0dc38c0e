"""Temperature normalisation shared by eo, x and y (docs/model.md#normalization).

The reference's global z-score (`normalize_temperature` / `denormalize_temperature`, one mean
and std for every level) and, as a config choice (`dataset.normalization: per_level`), a z-score
per depth level from the train split's statistics (`Normalizer`). The statistics are in Kelvin;
inputs and outputs of the public functions are in degrees Celsius.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KELVIN_OFFSET = 273.15
TEMP_MEAN_K = 289.74267177946783
TEMP_STD_K = 10.933397487585731
# Colour range of the plot helpers, degC.
PLOT_MIN_C = -10.7408
PLOT_MAX_C = 43.9262


def normalize_temperature(temp_c: torch.Tensor) -> torch.Tensor:
    """degC -> model space (global z-score)."""
    return (temp_c + KELVIN_OFFSET - TEMP_MEAN_K) / TEMP_STD_K


def denormalize_temperature(temp_norm: torch.Tensor) -> torch.Tensor:
    """Model space (global z-score) -> degC."""
    return temp_norm * TEMP_STD_K + TEMP_MEAN_K - KELVIN_OFFSET


@dataclass(frozen=True)
class Normalizer:
    """z = (T + 273.15 - mean_k) / std_k per depth level (channel), mean_k/std_k (D,) float64.

    "global": every level has the reference's TEMP_MEAN_K / TEMP_STD_K (bit-identical to
    normalize_temperature). "per_level": each level its own train-split mean and std, so a
    0.03 degC deep anomaly is not 0.003 in model units. A one-channel field (eo, the surface)
    uses level 0.
    """

    kind: str
    mean_k: np.ndarray
    std_k: np.ndarray

    @classmethod
    def global_(cls, levels: int = 50) -> Normalizer:
        return cls("global", np.full(levels, TEMP_MEAN_K), np.full(levels, TEMP_STD_K))

    @classmethod
    def per_level(cls, mean_c: list[float] | np.ndarray, std_c: list[float] | np.ndarray
                  ) -> Normalizer:
        mean = np.asarray(mean_c, np.float64)
        std = np.asarray(std_c, np.float64)
        if mean.ndim != 1 or mean.shape != std.shape or not mean.size:
            raise ValueError(f"per-level statistics need equal 1-D mean and std, got {mean.shape} "
                             f"and {std.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("per-level statistics must be finite with std > 0 (a level without "
                             "any valid train pixel has none: use dataset.normalization=global)")
        return cls("per_level", mean + KELVIN_OFFSET, std)

    @property
    def levels(self) -> int:
        return int(self.mean_k.size)

    def _stats(self, channels: int) -> tuple[np.ndarray, np.ndarray]:
        if channels == self.levels:
            return self.mean_k, self.std_k
        if channels == 1:
            return self.mean_k[:1], self.std_k[:1]
        raise ValueError(f"{self.kind} normalisation has {self.levels} levels; cannot apply it to "
                         f"{channels} channels (only {self.levels} or 1, the surface)")

    def _view(self, values: np.ndarray, like: torch.Tensor, dim: int) -> torch.Tensor:
        shape = [1] * like.ndim
        shape[dim] = values.size
        return torch.as_tensor(values, dtype=like.dtype, device=like.device).view(shape)

    def normalize(self, temp_c: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """degC -> model space; `dim` is the level (channel) axis."""
        if self.kind == "global":
            return normalize_temperature(temp_c)
        mean, std = self._stats(temp_c.shape[dim])
        return (temp_c + KELVIN_OFFSET - self._view(mean, temp_c, dim)) / self._view(std, temp_c, dim)

    def denormalize(self, temp_norm: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Model space -> degC; `dim` is the level (channel) axis."""
        if self.kind == "global":
            return denormalize_temperature(temp_norm)
        mean, std = self._stats(temp_norm.shape[dim])
        return temp_norm * self._view(std, temp_norm, dim) + self._view(mean, temp_norm, dim) - KELVIN_OFFSET


GLOBAL = Normalizer.global_()
