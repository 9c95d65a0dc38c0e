"""Global temperature z-score shared by eo, x and y (docs/model.md#normalization).

The statistics are in Kelvin; inputs and outputs of the public functions are in degrees Celsius.
"""

from __future__ import annotations

import torch

KELVIN_OFFSET = 273.15
TEMP_MEAN_K = 289.74267177946783
TEMP_STD_K = 10.933397487585731
# Colour range of the plot helpers, degC.
PLOT_MIN_C = -10.7408
PLOT_MAX_C = 43.9262


def normalize_temperature(temp_c: torch.Tensor) -> torch.Tensor:
    """degC -> model space."""
    return (temp_c + KELVIN_OFFSET - TEMP_MEAN_K) / TEMP_STD_K


def denormalize_temperature(temp_norm: torch.Tensor) -> torch.Tensor:
    """Model space -> degC."""
    return temp_norm * TEMP_STD_K + TEMP_MEAN_K - KELVIN_OFFSET
