"""What the evaluation programs share when they write a report: the folder and its files, number
formatting, the depth levels a table shows, and strict JSON for metrics.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

REPORT = "report.md"

# Levels a report table shows: the surface, the mixed layer, the thermocline and the deep ocean.
REPORT_DEPTHS_M = (0, 10, 50, 100, 250, 500, 1000, 2000)


def fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def report_levels(depth_m: np.ndarray) -> list[int]:
    """Indices of the model levels nearest to REPORT_DEPTHS_M (each once)."""
    return sorted({int(np.argmin(np.abs(depth_m - z))) for z in REPORT_DEPTHS_M})


def json_safe(o: Any) -> Any:
    """Plain JSON values (recursively): numpy scalars and arrays become numbers and lists, and
    NaN/inf become null, so metrics.json is strict JSON that any reader accepts."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, np.ndarray):
        o = o.tolist()
    if isinstance(o, list | tuple):
        return [json_safe(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def open_report(folder: str | Path) -> Path:
    """The report folder, created, without the report.md of an earlier run.

    report.md is written last, so a folder that holds one is a whole report: a rerun that stops
    halfway leaves new metrics and figures without it, never beside the old one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / REPORT).unlink(missing_ok=True)
    return folder


def write_text(path: Path, text: str) -> Path:
    """`text` written to a temporary file, fsynced and renamed into place: whole or absent."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Strict JSON (json_safe), written as write_text writes."""
    return write_text(path, json.dumps(json_safe(obj), indent=1, allow_nan=False))
