"""What the evaluation programs share when they write a report: number formatting, the depth
levels a table shows, and strict JSON for metrics.json."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Levels a report table shows: the surface, the mixed layer, the thermocline and the deep ocean.
REPORT_DEPTHS_M = (0, 10, 50, 100, 250, 500, 1000, 2000)


def fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def report_levels(depth_m: np.ndarray) -> list[int]:
    """Indices of the model levels nearest to REPORT_DEPTHS_M (each once)."""
    return sorted({int(np.argmin(np.abs(depth_m - z))) for z in REPORT_DEPTHS_M})


def json_default(o: Any) -> Any:
    """`json.dumps(default=...)` for numpy scalars and arrays."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def json_safe(o: Any) -> Any:
    """NaN/inf -> null (recursively), so metrics.json is strict JSON."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [json_safe(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
