"""Which implementation runs a kernel op's call on a GPU: a measured table, per call shape.

No implementation wins everywhere. On the first H100 (docs/gpu_run.md) the fused v2 front lost
to its epilogue variant at 7 of 11 front shapes, and inside a `torch.compile`d step inductor's
code for the eager reference beat both kernels at most shapes >= 384 channels and at every
PreNorm LayerNorm but one, while our kernels kept the 128^2 and 64^2 attention. So the choice
is a table, measured on one kind of GPU, keyed by the call and by whether it is being traced by
torch.compile:

    {"format": "depthdif_hpc dispatch table 2", "device": "NVIDIA H100 80GB HBM3",
     "source": "benchmarks/results/.../calls.csv",
     "entries": [{"op": "convnext_front", "shape": [96, 128, 128], "dtype": "bf16",
                  "layout": "channels_last", "compiled": false, "impl": "epilogue",
                  "ms": {"fused": 4.86, "epilogue": 3.12, "reference": 8.97}}, ...]}

* `op`: convnext_front, layer_norm or linear_attention. `shape`: the first tensor argument's
  sizes without the batch: (C, H, W) for the fronts and the norm, (heads, head size, positions)
  for the attention. `dtype`: that argument's (fp32, bf16, fp16).
* `layout`: "channels_last" for a call of a channels_last model (x in NHWC; the attention's q
  with its head axis at unit stride, as the qkv projection's views are), else "nchw".
* `compiled`: whether the call is being traced by torch.compile. `impl` "reference" then means
  inductor's code for the eager reference; our kernels are opaque to inductor, so their time
  is the same both ways.
* `impl`: for a front "fused" (the v2 kernels), "epilogue" (torch's depthwise conv + one fused
  kernel, convnext_epilogue.py) or "reference"; for the norm and the attention "triton" or
  "reference". `ms` (forward + backward per call) is informative.

`python benchmarks/gpu_stages.py dispatch_table --out <results folder> [--out <another>]` writes
it from GPU runs' per-call timings (docs/gpu_run.md). Which table is used, in order: the one
given to `set_dispatch_table(...)`; the file the environment variable DEPTHDIF_DISPATCH_TABLE
names (read once per process, at the first call), or none if it says "none"; else the table
shipped for the device, `dispatch_tables/<device name, spaces as _>.json` beside this file
(committed from the device's measured results). A table applies only on the device it was
measured on (`device`: torch.cuda.get_device_name, "cpu" for the CPU rehearsal). On any other
device, and for a call it does not list, the kernel runs (the fused front), as without a table.
The table only picks among implementations the kernel mode allows: under ``model.kernels:
eager`` the reference runs everywhere (dispatch.py).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from ._utils import is_channels_last

FORMAT = "depthdif_hpc dispatch table 2"
ENV = "DEPTHDIF_DISPATCH_TABLE"
REFERENCE = "reference"
# Per op its implementations; the first is what runs without a table entry.
IMPLS: dict[str, tuple[str, ...]] = {
    "convnext_front": ("fused", "epilogue", REFERENCE),
    "layer_norm": ("triton", REFERENCE),
    "linear_attention": ("triton", REFERENCE),
}
Layout = Literal["channels_last", "nchw"]
LAYOUTS: tuple[Layout, ...] = ("channels_last", "nchw")
# (op, shape without the batch, dtype of the first argument, layout, compiled)
Key = tuple[str, tuple[int, ...], str, str, bool]


def default_impl(op: str) -> str:
    """What runs for a call the table does not list: the op's kernel."""
    return IMPLS[op][0]


@dataclass(frozen=True)
class DispatchTable:
    """A parsed table: (op, shape, dtype, layout, compiled) -> implementation, for one device."""

    device: str
    entries: dict[Key, str]
    source: str = ""

    @classmethod
    def from_dict(cls, data: Any, where: str = "dispatch table") -> DispatchTable:
        """Validate and parse; a malformed table is an error naming `where` and the culprit."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            hint = (" (a front table of format 1: write it again from its calls.csv with "
                    "`python benchmarks/gpu_stages.py dispatch_table`)"
                    if isinstance(found, str) and "front table" in found else "")
            raise ValueError(f"{where}: not a dispatch table (expected \"format\": {FORMAT!r}, "
                             f"found {found!r}){hint}")
        device = data.get("device")
        if not isinstance(device, str) or not device:
            raise ValueError(f"{where}: \"device\" must name the device the table was measured on")
        rows = data.get("entries")
        if not isinstance(rows, list):
            raise ValueError(f"{where}: \"entries\" must be a list")
        entries: dict[Key, str] = {}
        for i, e in enumerate(rows):
            try:
                op, impl, layout = str(e["op"]), e["impl"], e["layout"]
                shape = tuple(int(s) for s in e["shape"])
                compiled = e["compiled"]
                key: Key = (op, shape, str(e["dtype"]), layout, compiled)
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{where}: entry {i} needs an op, a shape (a list of integers), "
                                 f"a dtype, a layout, compiled and an impl "
                                 f"({type(exc).__name__}: {exc})") from None
            if op not in IMPLS:
                raise ValueError(f"{where}: entry {i} op {op!r} is not one of {tuple(IMPLS)}")
            if impl not in IMPLS[op]:
                raise ValueError(f"{where}: entry {i} impl {impl!r} is not one of {IMPLS[op]} "
                                 f"(the implementations of {op})")
            if len(shape) != 3:
                raise ValueError(f"{where}: entry {i} shape {list(shape)} needs 3 sizes")
            if layout not in LAYOUTS:
                raise ValueError(f"{where}: entry {i} layout {layout!r} is not one of {LAYOUTS}")
            if impl == "epilogue" and layout != "channels_last":
                raise ValueError(f"{where}: entry {i}: the epilogue front runs on channels_last "
                                 f"inputs only, not {layout}")
            if not isinstance(compiled, bool):
                raise ValueError(f"{where}: entry {i} compiled must be true or false, "
                                 f"not {compiled!r}")
            if key in entries and entries[key] != impl:
                raise ValueError(f"{where}: entry {i} contradicts an earlier one for {key}")
            entries[key] = impl
        return cls(device, entries, str(data.get("source", "")))

    @classmethod
    def load(cls, path: str | Path) -> DispatchTable:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise FileNotFoundError(f"dispatch table {p} ({ENV}): cannot read it: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"dispatch table {p}: not valid JSON ({exc})") from None
        return cls.from_dict(data, where=f"dispatch table {p}")

    def choose(self, op: str, shape: tuple[int, ...], dtype: str, layout: str, compiled: bool,
               device: str) -> str:
        """The implementation for a call; the op's kernel off this table's device or calls."""
        if device != self.device:
            return default_impl(op)
        return self.entries.get((op, tuple(shape), dtype, layout, compiled), default_impl(op))


SHIPPED = Path(__file__).resolve().parent / "dispatch_tables"
_LOCK = threading.Lock()
# table: the explicit or environment table; shipped: whether, without one, the device's shipped
# table applies (not after set_dispatch_table or DEPTHDIF_DISPATCH_TABLE=none).
_STATE: dict[str, Any] = {"table": None, "from_env": True, "shipped": True}
_SHIPPED: dict[str, DispatchTable | None] = {}
_WARNED: set[str] = set()


def shipped_path(name: str) -> Path:
    """Where the table for the device called `name` is shipped (whether or not there is one)."""
    return SHIPPED / (name.replace(" ", "_") + ".json")


def shipped_table(name: str) -> DispatchTable | None:
    """The table shipped for the device called `name`, if there is one (loaded once)."""
    with _LOCK:
        if name not in _SHIPPED:
            path = shipped_path(name)
            _SHIPPED[name] = DispatchTable.load(path) if path.is_file() else None
        return _SHIPPED[name]


def set_dispatch_table(table: DispatchTable | dict | str | Path | None) -> DispatchTable | None:
    """Use this table from now on in this process (a DispatchTable, its dict, a JSON path), or
    none (None: every kernel runs; the environment variable is no longer read)."""
    if isinstance(table, str | Path):
        table = DispatchTable.load(table)
    elif isinstance(table, dict):
        table = DispatchTable.from_dict(table)
    with _LOCK:
        _STATE.update(table=table, from_env=False, shipped=False)
    return table


def reset_dispatch_table() -> None:
    """Forget any table; the environment variable is read again at the next call."""
    with _LOCK:
        _STATE.update(table=None, from_env=True, shipped=True)
        _SHIPPED.clear()
        _WARNED.clear()


def dispatch_table(name: str | None = None) -> DispatchTable | None:
    """The table in use (see the module docstring): set_dispatch_table's, else
    DEPTHDIF_DISPATCH_TABLE's, else, given a device's `name` (`device_name`), its shipped one."""
    with _LOCK:
        if _STATE["from_env"]:
            path = os.environ.get(ENV, "")
            off = path.strip().lower() == "none"
            _STATE["table"] = DispatchTable.load(path) if path and not off else None
            _STATE["shipped"] = not path
            _STATE["from_env"] = False
        table, shipped = _STATE["table"], _STATE["shipped"]
    if table is None and shipped and name is not None:
        return shipped_table(name)
    return table


@functools.cache
def device_name(device: torch.device) -> str:
    """The name a table's `device` is compared with: the CUDA device's name, else its type.

    Cached: the dispatcher asks for every kernel call it makes outside torch.compile, and a
    device's name does not change (the calls pass tensors' devices, which carry an index)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def call_layout(op: str, x: torch.Tensor) -> Layout:
    """The layout class of a call whose first tensor argument is `x` (see the module docstring)."""
    if op == "linear_attention":  # q: (B, heads, d, N)
        return "channels_last" if x.shape[2] > 1 and x.stride(2) == 1 else "nchw"
    return "channels_last" if is_channels_last(x) else "nchw"


def choose(op: str, shape: tuple[int, ...], dtype: str, layout: str, compiled: bool,
           device: torch.device) -> str:
    """The implementation of `op` for a call (see the module docstring)."""
    name = device_name(device)
    table = dispatch_table(name)
    if table is None:
        return default_impl(op)
    if name != table.device and name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"dispatch table {table.source or '(set in code)'} was measured on "
                      f"{table.device!r}, not on {name!r}: every kernel runs",
                      RuntimeWarning, stacklevel=2)
    return table.choose(op, shape, dtype, layout, compiled, name)
