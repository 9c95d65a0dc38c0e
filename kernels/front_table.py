"""Which ConvNeXt front runs for a channels_last call: the fused v2 kernels or the epilogue variant.

Neither front wins everywhere by construction (convnext_epilogue.py says what each pays), so
the choice is a measured table, per call shape (C, H, W) and dtype of x, of one kind of GPU:

    {"format": "depthdif_hpc front table 1", "device": "NVIDIA H100 80GB HBM3",
     "source": "benchmarks/results/.../calls.csv",
     "entries": [{"C": 96, "H": 128, "W": 128, "dtype": "bf16", "impl": "epilogue",
                  "fused_ms": 1.91, "epilogue_ms": 1.62}, ...]}

`python benchmarks/gpu_stages.py front_table --calls <calls.csv> --out <json>` writes it from a
GPU run's per-call timings (forward + backward; docs/gpu_run.md). Which table is used, in order:
the one given to `set_front_table(...)`; the file the environment variable DEPTHDIF_FRONT_TABLE
names (read once per process, at the first channels_last front call), or none if it says
"none"; else the table shipped for the device, `front_tables/<device name, spaces as _>.json`
beside this file (committed from the device's measured results). A table applies only on the
device it was measured on (`device`: torch.cuda.get_device_name, "cpu" for the CPU rehearsal);
on any other device, and for a shape or dtype it does not list, the fused v2 front runs, which
is the behaviour without a table. `impl` of an entry: "fused" or "epilogue"; the timings are
informative.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT = "depthdif_hpc front table 1"
ENV = "DEPTHDIF_FRONT_TABLE"
IMPLS = ("fused", "epilogue")
Shape = tuple[int, int, int, str]  # (C, H, W, dtype of x: fp32 | bf16 | fp16)


@dataclass(frozen=True)
class FrontTable:
    """A parsed table: (C, H, W, dtype) -> "fused" | "epilogue", for one device."""

    device: str
    entries: dict[Shape, str]
    source: str = ""

    @classmethod
    def from_dict(cls, data: Any, where: str = "front table") -> FrontTable:
        """Validate and parse; a malformed table is an error naming `where` and the culprit."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a front table (expected \"format\": {FORMAT!r})")
        device = data.get("device")
        if not isinstance(device, str) or not device:
            raise ValueError(f"{where}: \"device\" must name the device the table was measured on")
        rows = data.get("entries")
        if not isinstance(rows, list):
            raise ValueError(f"{where}: \"entries\" must be a list")
        entries: dict[Shape, str] = {}
        for i, e in enumerate(rows):
            try:
                key = (int(e["C"]), int(e["H"]), int(e["W"]), str(e["dtype"]))
                impl = e["impl"]
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{where}: entry {i} needs integer C, H, W, a dtype and an impl "
                                 f"({type(exc).__name__}: {exc})") from None
            if impl not in IMPLS:
                raise ValueError(f"{where}: entry {i} impl {impl!r} is not one of {IMPLS}")
            if key in entries and entries[key] != impl:
                raise ValueError(f"{where}: entry {i} contradicts an earlier one for {key}")
            entries[key] = impl
        return cls(device, entries, str(data.get("source", "")))

    @classmethod
    def load(cls, path: str | Path) -> FrontTable:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise FileNotFoundError(f"front table {p} (DEPTHDIF_FRONT_TABLE): cannot read it: "
                                    f"{exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"front table {p}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where=f"front table {p}")

    def choose(self, C: int, H: int, W: int, dtype: str, device: str) -> str:
        """"fused" or "epilogue" for a call; "fused" off this table's device or shapes."""
        if device != self.device:
            return "fused"
        return self.entries.get((C, H, W, dtype), "fused")


SHIPPED = Path(__file__).resolve().parent / "front_tables"
_LOCK = threading.Lock()
# table: the explicit or environment table; shipped: whether, without one, the device's shipped
# table applies (not after set_front_table or DEPTHDIF_FRONT_TABLE=none).
_STATE: dict[str, Any] = {"table": None, "from_env": True, "shipped": True}
_SHIPPED: dict[str, FrontTable | None] = {}
_WARNED: set[str] = set()


def shipped_path(name: str) -> Path:
    """Where the table for the device called `name` is shipped (whether or not there is one)."""
    return SHIPPED / (name.replace(" ", "_") + ".json")


def shipped_table(name: str) -> FrontTable | None:
    """The table shipped for the device called `name`, if there is one (loaded once)."""
    with _LOCK:
        if name not in _SHIPPED:
            path = shipped_path(name)
            _SHIPPED[name] = FrontTable.load(path) if path.is_file() else None
        return _SHIPPED[name]


def set_front_table(table: FrontTable | dict | str | Path | None) -> FrontTable | None:
    """Use this table from now on in this process (a FrontTable, its dict, a JSON path), or none
    (None: the fused front everywhere; the environment variable is no longer read)."""
    if isinstance(table, str | Path):
        table = FrontTable.load(table)
    elif isinstance(table, dict):
        table = FrontTable.from_dict(table)
    with _LOCK:
        _STATE.update(table=table, from_env=False, shipped=False)
    return table


def reset_front_table() -> None:
    """Forget any table; the environment variable is read again at the next call."""
    with _LOCK:
        _STATE.update(table=None, from_env=True, shipped=True)
        _SHIPPED.clear()
        _WARNED.clear()


def front_table(name: str | None = None) -> FrontTable | None:
    """The table in use (see the module docstring): set_front_table's, else DEPTHDIF_FRONT_TABLE's,
    else, given a device's `name` (`device_name`), the one shipped for it."""
    with _LOCK:
        if _STATE["from_env"]:
            path = os.environ.get(ENV, "")
            off = path.strip().lower() == "none"
            _STATE["table"] = FrontTable.load(path) if path and not off else None
            _STATE["shipped"] = not path
            _STATE["from_env"] = False
        table, shipped = _STATE["table"], _STATE["shipped"]
    if table is None and shipped and name is not None:
        return shipped_table(name)
    return table


def device_name(device: torch.device) -> str:
    """The name a table's `device` is compared with: the CUDA device's name, else its type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def choose_front(C: int, H: int, W: int, dtype: str, device: torch.device) -> str:
    """"fused" or "epilogue" for a channels_last front call (see the module docstring)."""
    name = device_name(device)
    table = front_table(name)
    if table is None:
        return "fused"
    if name != table.device and name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"front table {table.source or '(set in code)'} was measured on "
                      f"{table.device!r}, not on {name!r}: the fused front runs everywhere",
                      RuntimeWarning, stacklevel=2)
    return table.choose(C, H, W, dtype, name)
