"""Stages of `benchmarks/gpu_run.sh`: one process per stage, rows appended to CSVs in --out.

    python benchmarks/gpu_stages.py STAGE --out DIR --work DIR [--rehearsal]

STAGE is one of deps, env, parity, calls, calls_compile, step, step_compile, profile, latent, sample,
trainer (measure; exit status 0 = the stage did what it says), report (render report.md and
the headline lines of summary.txt from the CSVs) or dispatch_table (after the run, on any machine:
write the dispatch table of the results in one or more --out to --table; docs/gpu_run.md).
gpu_run.sh runs them in order of value, each
under its own time limit, and docs/gpu_run.md says what each one measures and writes.

On a CUDA machine every stage runs the real shapes (ambient preset, 128 x 128, batch 48).
--rehearsal runs the same code on the CPU with the Triton interpreter and tiny shapes, so that
CI exercises every stage's wiring; its numbers time the interpreter, not the kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import gc
import importlib
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# One CSV per kind of result; gpu_run.sh adds summary.txt, report.md and log.txt (8 files).
TABLES: dict[str, list[str]] = {
    "env": ["key", "value"],
    "parity": ["kernel", "case", "mix", "tensor", "dtype", "err_kernel", "err_eager", "tol", "ok",
               "note"],
    "calls": ["kind", "call", "sites", "per_step", "batch", "shape", "dtypes", "impl", "fwd_ms",
              "fwdbwd_ms", "bwd_ms", "host_ms", "speedup_fwdbwd", "note"],
    "steps": ["stage", "preset", "mode", "objective", "batch", "height", "width", "step_ms",
              "samples_per_s", "peak_mem_gib", "gflop_per_sample", "mfu", "warmup_s",
              "loss_first", "loss_last", "note"],
    "profile": ["mode", "batch", "class", "device_ms", "share", "kernels", "top_kernel"],
}
PRESETS = {
    "ambient": ["configs/px_space/model_config_ambient.yaml", "configs/px_space/training_config.yaml"],
    "latent": ["configs/lat_space/model_config.yaml", "configs/lat_space/training_config.yaml"],
}
DATA_CONFIG = "configs/px_space/data_config.yaml"
# Modules the trainer and the synthetic store builder import beyond the GPU image.
TRAINER_MODULES = ("omegaconf", "zarr", "numcodecs", "google_crc32c", "deepspeed", "submitit",
                   "netCDF4", "cftime", "global_land_mask")
# What the env stage reports (import name -> distribution name).
PACKAGES = {"numpy": "numpy", "accelerate": "accelerate", "omegaconf": "omegaconf", "zarr": "zarr",
            "numcodecs": "numcodecs", "google_crc32c": "google-crc32c", "deepspeed": "deepspeed",
            "submitit": "submitit", "netCDF4": "netCDF4", "global_land_mask": "global-land-mask",
            "yaml": "PyYAML", "xarray": "xarray", "scipy": "scipy", "tensorboard": "tensorboard",
            "safetensors": "safetensors", "skimage": "scikit-image", "pytest": "pytest",
            "xdist": "pytest-xdist"}
# A step mode is "+"-joined tokens: eager|triton, then the trainer's speed options
# (docs/cluster.md, "Speed options"): compile, cl (channels_last), fused (fused AdamW),
# ckpt (activation checkpointing of every level), bench (cudnn.benchmark), table (each call's
# implementation chosen by the dispatch table of this run's calls stages, else the shipped one).
# channels_last is the trainer's default on CUDA (its first H100 run: 130.8 ms against 207.1 ms
# NCHW for the Triton step), so the baselines that matter are channels_last ones: eager+cl
# (cuDNN's NHWC convolutions, no kernel of ours) and, for torch.compile, compile+cl first. The
# NCHW Triton step and activation checkpointing (270.1 ms, 6.1 GiB against 11.5) are in that
# run's results; leaving them out keeps the stages before the compile ones within 480 s. For
# the same reason torch.compile runs channels_last only: each mode is a compilation of the whole
# U-Net, and an NCHW one would measure a layout the trainer does not use on CUDA.
MODE_TOKENS = frozenset({"eager", "triton", "compile", "cl", "fused", "ckpt", "bench", "table",
                         "shipped"})
STEP_MODES = ("eager", "eager+cl", "triton+cl", "triton+cl+table", "triton+cl+table+fused+bench")
COMPILE_STEP_MODES = ("compile+cl", "triton+compile+cl", "triton+compile+cl+table+fused+bench")


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: the real ones on a GPU, tiny ones in the CPU rehearsal."""

    rehearsal: bool
    batch: int  # per-call timings and training steps start here (halved on OOM)
    px: int  # pixel-space patch side
    parity_batch: int
    unet_parity_px: int
    tiny: dict = field(default_factory=dict)  # config overrides (nested dict)
    warmup_steps: int = 3  # untimed steps first; 0: the first step is the timed one
    timed_steps: int = 10
    compile_backend: str = "inductor"
    trainer_steps: int = 50
    trainer_batch: int = 32
    # sample: DepthDif.predict with a DDIM chain of this many steps at this batch, per mode
    # (a "+bf16" token is `predict --precision bf16`: the denoiser under bf16 autocast).
    sample_steps: int = 50
    sample_batch: int = 16
    sample_modes: tuple[str, ...] = ("eager", "triton", "triton+cl", "triton+cl+bf16")
    # trainer: DDIM steps of the predict run on the first run's checkpoint
    predict_ddim_steps: int = 20
    # DeepSpeed ZeRO-2 (the scale-out path) first, then DDP (the presets' default launch); the
    # second process finds the first one's Triton cache, so it costs ~40 s more.
    trainer_launches: tuple[str, ...] = ("zero2", "ddp")
    # TRAINER_COMPILE=1: the trainer runs with trainer.compile=true (the whole step measured
    # 1.66x over eager; the trainer around a compiled U-Net has not run on a GPU yet).
    trainer_compile: bool = False
    step_modes: tuple[str, ...] = STEP_MODES
    compile_step_modes: tuple[str, ...] = COMPILE_STEP_MODES
    # The two modes of the latent stage (and the trainer's batch): eager and the Triton
    # kernels, as the trainer runs them on CUDA (channels_last); the eager one is also
    # step_compile's baseline when the run has no step stage.
    kernel_modes: tuple[str, str] = ("eager+cl", "triton+cl")
    parity_mixes: tuple[str, ...] = ("fp32", "bf16", "training")
    # gpu_tests: pytest-xdist workers where it is installed (the GPU image has it; 16 cores);
    # 0: one process (the rehearsal, inside the CI suite's own workers). 4 workers ran 138 of
    # the ~190 tests in 135 s on an H100, mostly Triton compilations, which are CPU-bound.
    gpu_test_workers: int = 8
    # calls, calls_compile: each call on channels_last inputs, the trainer's layout on CUDA.
    # NCHW ("") was timed by the first H100 run (committed results; its v1 front was 1.09x
    # over eager there) and would cost 2 of the stage's 5 rows per call.
    call_layouts: tuple[str, ...] = ("+cl",)
    profile_modes: tuple[str, ...] = ("eager+cl", "triton+cl")
    # parity: the U-Net's Triton run in channels_last with every front on the epilogue variant
    unet_parity_epilogue: bool = False
    trainer_tile: int = 128
    # Train days of the trainer's synthetic store (4 tiles a day, 2017) and its one val day.
    trainer_dates: tuple[str, str] = ("2017-12-08", "2018-01-01")
    # env's two ceilings: a device-to-device copy of this many MiB, a bf16 n x n x n product.
    # 1 GiB and 8192: each well past the 50 MB L2 and launch overhead (~0.7 and ~1.4 ms).
    ceiling_copy_mib: int = 1024
    ceiling_matmul_n: int = 8192

    @classmethod
    def make(cls, rehearsal: bool) -> Plan:
        """The plan of a GPU run or of the rehearsal, with the step modes `STEP_MODES` and
        `COMPILE_STEP_MODES` name, when set (a session measures what earlier runs left open)."""
        plan = cls._sizes(rehearsal)
        chosen: dict[str, Any] = {f: modes_from_env(f.upper())
                                  for f in ("step_modes", "compile_step_modes")}
        flag = os.environ.get("TRAINER_COMPILE", "0").strip()
        if flag not in ("0", "1"):
            raise ValueError(f"TRAINER_COMPILE={flag!r}: 0 or 1")
        chosen["trainer_compile"] = flag == "1"
        return dataclasses.replace(plan, **{f: m for f, m in chosen.items() if m is not None})

    @classmethod
    def _sizes(cls, rehearsal: bool) -> Plan:
        if not rehearsal:
            return cls(False, batch=48, px=128, parity_batch=2, unet_parity_px=64)
        # A one-level U-Net of width 8 (every kind of block and kernel call is still there) on
        # 8 x 8 pixels, one sample: the interpreter costs ~0.4 s per program instance of the
        # front kernels, and each kernel variant's self-check runs at the call's size.
        # aot_eager: dynamo + AOTAutograd + the custom ops' fake kernels, as on the GPU, without
        # inductor's C++ code generation (minutes on 2 cores).
        # Every stage and code path once, nothing twice: one step per measurement (its first:
        # no separate warm-up), the parity's training mix only (fp32 parameters, bf16
        # activations: both dtypes), per-call timings on channels_last inputs only (v1 runs in
        # the op parity), and the Triton steps (step, profile, latent, compile) and the U-Net
        # parity in channels_last with a table that picks the epilogue front (the calls
        # stage's own kernels-only table does: a rehearsal's calls.csv had 0.09-0.25 s forward +
        # backward per front call against 1.3-2.6 s for v1 or v2, whose 49-tap programs the
        # interpreter runs in Python). The speed options once (ckpt on the eager step, the
        # others on the Triton one), the profile of the Triton step only, torch.compile once.
        return cls(True, batch=1, px=8, parity_batch=1, unet_parity_px=8,
                   tiny={"model": {"unet": {"dim": 8, "dim_mults": [1]}}},
                   warmup_steps=0, timed_steps=1, compile_backend="aot_eager",
                   trainer_steps=10, trainer_batch=2, trainer_tile=32,
                   sample_steps=2, sample_batch=1, sample_modes=("eager", "triton+cl+bf16"),
                   predict_ddim_steps=2,
                   trainer_dates=("2017-12-30", "2018-01-03"),
                   step_modes=("eager+ckpt", "triton+cl+table+fused+bench"),
                   compile_step_modes=("triton+compile+cl+table",),
                   kernel_modes=("eager+ckpt", "triton+cl+table+fused+bench"),
                   parity_mixes=("training",), gpu_test_workers=0,
                   profile_modes=("triton+cl+table+fused+bench",), unet_parity_epilogue=True,
                   ceiling_copy_mib=16, ceiling_matmul_n=256)


# ============================================================================ small helpers


def modes_from_env(var: str) -> tuple[str, ...] | None:
    """Step modes from environment variable `var` (space- or comma-separated), each checked
    against MODE_TOKENS; None when it is unset."""
    text = os.environ.get(var, "").replace(",", " ").split()
    if not text:
        return None
    for mode in text:
        check_mode(mode, var)
    return tuple(text)


def check_mode(mode: str, where: str = "step mode") -> set[str]:
    """A step mode's tokens; unknown ones, or two tables, are an error naming `where`."""
    tokens = set(mode.split("+"))
    unknown = tokens - MODE_TOKENS
    if unknown:
        raise ValueError(f"{where}: mode {mode!r} has unknown options {sorted(unknown)} "
                         f"(options: {sorted(MODE_TOKENS)})")
    if {"table", "shipped"} <= tokens:
        raise ValueError(f"{where}: mode {mode!r}: 'table' (this run's) or 'shipped', not both")
    return tokens


def log(msg: str) -> None:
    print(msg, flush=True)


def append(out: Path, table: str, row: dict[str, Any]) -> None:
    """One row into out/<table>.csv (header written with the first row); flushed at once so
    a stage stopped by its time limit keeps what it measured."""
    path = out / f"{table}.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLES[table], extrasaction="raise")
        if new:
            w.writeheader()
        w.writerow({k: _fmt(row.get(k)) for k in TABLES[table]})


def read(out: Path, table: str) -> list[dict[str, str]]:
    path = out / f"{table}.csv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def fnum(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def dname(dtype: Any) -> str:
    from depthdif_hpc.kernels import dtype_name

    return dtype_name(dtype)


def module_version(mod: str) -> str | None:
    """Version of an importable module (its distribution's), None when it is not importable."""
    try:
        if importlib.util.find_spec(mod) is None:
            return None
    except (ImportError, ValueError):
        return None
    from importlib import metadata

    try:
        return metadata.version(PACKAGES.get(mod, mod))
    except metadata.PackageNotFoundError:
        try:
            return str(getattr(importlib.import_module(mod), "__version__", "present"))
        except Exception:  # noqa: BLE001 - present but broken: say so
            return "present (import fails)"


# ============================================================================ config and models


def _scalar(text: str) -> Any:
    t = text.strip()
    if t in ("null", "~", ""):
        return None
    if t in ("true", "false"):
        return t == "true"
    if t.startswith("[") and t.endswith("]"):
        return [_scalar(p) for p in t[1:-1].split(",") if p.strip()]
    if t[0] in "'\"" and t[-1] == t[0]:
        return t[1:-1]
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def mini_yaml(text: str) -> dict:
    """The YAML subset of the project's model/training configs (nested mappings, scalars, flow
    lists, comments): the GPU image may lack PyYAML when it runs from a plain checkout."""
    root: dict = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    for raw in text.splitlines():
        line = raw.split(" #")[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        key, _, value = line.strip().partition(":")
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        if value.strip():
            parent[key.strip()] = _scalar(value)
        else:
            parent[key.strip()] = child = {}
            stack.append((indent, child))
    return root


def load_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError:
        return mini_yaml(path.read_text())
    return yaml.safe_load(path.read_text()) or {}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _dotted(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out += _dotted(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={json.dumps(v) if isinstance(v, list) else v}")
    return out


def _apply(obj: Any, data: dict, where: str) -> None:
    for k, v in data.items():
        if not hasattr(obj, k):
            raise KeyError(f"{where}{k}: not in the config schema")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            _apply(cur, v, f"{where}{k}.")
        else:
            setattr(obj, k, v)


def load_cfg(files: list[str], extra: dict) -> tuple[Any, str]:
    """(Config, how it was read): the project's loader, or without omegaconf (a plain GPU image)
    the YAML applied onto the schema's dataclasses (no validation; the trainer stage, which
    needs the loader anyway, validates the real thing)."""
    from depthdif_hpc import config as C

    try:
        return C.load_config(*(ROOT / f for f in files), overrides=_dotted(extra)), "load_config"
    except ModuleNotFoundError as exc:
        if exc.name != "omegaconf":
            raise
    merged: dict = {}
    for f in files:
        merged = _merge(merged, load_yaml(ROOT / f))
    merged = _merge(merged, extra)
    cfg = C.Config()
    _apply(cfg, merged, "")
    return cfg, "YAML onto the schema (no omegaconf)"


@dataclass
class Workload:
    """A model, a synthetic batch maker and the training objective, as the trainer runs them."""

    preset: str
    objective: str
    model: Any  # torch.nn.Module: what the optimizer trains and what FLOPs are counted on
    unet: Any  # the U-Net inside it (kernel routing, torch.compile)
    make_batch: Callable[[int, int], dict]
    loss: Callable[[dict], Any]


def synthetic_batch(b: int, size: int, device: Any, depth: int = 50, seed: int = 0) -> dict:
    """A store-like batch: dense y, ~2% observed Argo columns in x, EO, masks, coords, date."""
    import torch

    g = torch.Generator().manual_seed(seed)
    y = torch.randn(b, depth, size, size, generator=g)
    cols = torch.rand(b, 1, size, size, generator=g) < 0.02
    cols[:, :, size // 2, size // 2] = True  # never an empty observation set
    x_valid = cols.expand(b, depth, size, size).clone()
    lat = torch.rand(b, generator=g) * 60 - 30
    lon = torch.rand(b, generator=g) * 360 - 180
    batch = {"x": y * x_valid, "y": y, "eo": y[:, :1].clone(), "x_valid_mask": x_valid,
             "y_valid_mask": torch.ones(b, depth, size, size, dtype=torch.bool),
             "land_mask": torch.ones(b, 1, size, size), "coords": torch.stack([lat, lon], 1),
             "date": torch.full((b,), 20180115, dtype=torch.int64)}
    return {k: v.to(device) for k, v in batch.items()}


def workload(preset: str, plan: Plan, device: Any, work: Path) -> Workload:
    """The preset's model as `build_model` makes it (the trainer's path), on `device`. The
    latent preset gets an autoencoder with random weights, saved under `work` as the checkpoint
    it loads: a step costs the same whatever the weights, and no trained one is needed."""
    import torch

    from depthdif_hpc import build_model

    cfg, how = load_cfg(PRESETS[preset], plan.tiny)
    if preset == "latent":
        lat = cfg.model.latent
        ae_cfg, _ = load_cfg([lat.ae_config_path], {})
        if how != "load_config":  # reading the AE config again would need the loader
            cfg.ae, lat.ae_config_path = ae_cfg.ae, None
        path = work / "random_autoencoder.pt"
        torch.save(build_model(ae_cfg).state_dict(), path)
        lat.ae_checkpoint = str(path)
    model = build_model(cfg).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    return Workload(preset, f"{type(model).__name__}.loss (config: {how})", model, model.model,
                    lambda b, size: synthetic_batch(b, size, device),
                    lambda batch: model(batch, generator=gen)[0])


def autocast(device: Any) -> Any:
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16)


def oom_error() -> type[BaseException]:
    import torch

    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def raise_recompile_limits() -> None:
    """torch.compile of one function at many shapes: dynamo's default of 8 recompiles would
    silently fall back to eager for the rest."""
    import torch._dynamo as dyn

    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dyn.config, knob):
            setattr(dyn.config, knob, 512)


# ============================================================================ timing


class Bench:
    """Median device time of fn() in ms. CUDA: the device is held by a sleep kernel while the
    host issues the repetition, so the events around it time the device's work alone, not the
    host's launches: without the hold, a call that is small on the device timed the host (the
    first H100 runs' forward + backward of a 19 MB LayerNorm: ~1 ms, whichever implementation),
    and a training step, whose queue runs ahead of the device, hides exactly that time. The L2
    cache is flushed (a buffer twice its size zeroed) before each repetition, gradients of
    `grads` reset outside the timed region. After a call: `spread`, the repetitions'
    interquartile range over the median (the noise a difference between two timings must
    exceed); `host_ms`, the median host time to issue fn(); `late`, the repetitions whose
    issue outlasted the hold (their device time may hold a gap). CPU (rehearsal): wall clock
    of one run: the wiring, not a measurement (spread and host_ms None)."""

    def __init__(self, device: Any, rep_ms: float = 150.0, warmup_ms: float = 40.0) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.rep_ms, self.warmup_ms = rep_ms, warmup_ms
        self.spread: float | None = None
        self.host_ms: float | None = None
        self.late = 0
        self.flush = None
        self.cycles_per_ms = 0.0
        if self.cuda:
            props = torch.cuda.get_device_properties(device)
            l2 = int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
            self.flush = torch.empty(max(2 * l2, 64 * 2**20) // 4, dtype=torch.int32, device=device)
            self.cycles_per_ms = sleep_cycles_per_ms()

    def hold(self, ms: float) -> None:
        """Keep the device busy for about `ms` (torch.cuda._sleep spins for a cycle count)."""
        import torch

        torch.cuda._sleep(max(1, int(ms * self.cycles_per_ms)))

    def __call__(self, fn: Callable[[], Any], grads: tuple = ()) -> float:
        import torch

        def reset() -> None:
            for t in grads:
                t.grad = None

        self.late = 0
        if not self.cuda:
            reset()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        reset()
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(3):
            reset()
            fn()
        torch.cuda.synchronize()
        est = max((time.perf_counter() - t0) * 1e3 / 3, 1e-3)  # >= the host's and the device's
        for _ in range(max(1, min(50, int(self.warmup_ms / est)))):
            reset()
            fn()
        n = max(5, min(200, int(self.rep_ms / (2 * est))))
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
        hold_ms, host = est + 0.05, []
        torch.cuda.synchronize()
        for s, e in ev:
            reset()
            self.flush.zero_()
            self.hold(hold_ms)
            h0 = time.perf_counter()
            s.record()
            fn()
            e.record()
            h = (time.perf_counter() - h0) * 1e3
            host.append(h)
            self.late += h > hold_ms
            # The next hold: 1.5x the slowest issue yet, never longer than the first estimate.
            hold_ms = min(est, 1.5 * max(host)) + 0.05
            # One repetition in flight at a time: a host far ahead would fill the launch queue,
            # and block inside fn(), timing the device as the host.
            e.synchronize()
        times = [s.elapsed_time(e) for s, e in ev]
        q1, med, q3 = statistics.quantiles(times, n=4)
        self.spread = (q3 - q1) / med if med > 0 else None
        self.host_ms = statistics.median(host)
        return med


def sleep_cycles_per_ms() -> float:
    """The device's torch.cuda._sleep cycles per ms (its clock under the spin), timed once."""
    import torch

    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    for _ in range(2):  # the first also loads the kernel
        s.record()
        torch.cuda._sleep(cycles)
        e.record()
        e.synchronize()
    return cycles / max(s.elapsed_time(e), 1e-3)


# ============================================================================ kernel calls

FRONT_ARGS = ("x", "dw_weight", "dw_bias", "time_bias", "film_scale", "film_shift", "ln_weight",
              "ln_bias")
NORM_ARGS = ("x", "weight", "bias")


@dataclass
class Call:
    """One distinct kernel call of a U-Net forward: what selects a compiled kernel (shape and
    argument dtypes, absent arguments) and where the model makes it."""

    kind: str  # front | attention | norm (the attention's PreNorm)
    shape: tuple[int, ...]  # front, norm: (C, H, W); attention: (heads, d, H, W)
    dtypes: tuple[str | None, ...]  # per tensor argument, None when the model passes None
    extra: float  # eps (front, norm) or scale (attention)
    sites: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.kind == "front":
            c, h, w = self.shape
            flags = [f for f, i in (("noLN", 6), ("noTB", 3), ("noFiLM", 4)) if self.dtypes[i] is None]
            if self.dtypes[0] != "bf16":
                flags.append(f"x {self.dtypes[0]}")
            return f"front C{c} {h}x{w}" + (f" ({', '.join(flags)})" if flags else "")
        if self.kind == "norm":
            c, h, w = self.shape
            return f"norm C{c} {h}x{w}" + (f" (x {self.dtypes[0]})" if self.dtypes[0] != "bf16" else "")
        heads, d, h, w = self.shape
        return f"attention N{h * w} ({h}x{w}, {heads}x{d})"

    def dtype_text(self) -> str:
        names = {"front": FRONT_ARGS, "norm": NORM_ARGS}.get(self.kind, ("q", "k", "v"))
        return " ".join(f"{n}={d}" for n, d in zip(names, self.dtypes, strict=True) if d is not None)


def record_calls(unet: Any, batch: int, px: int, device: Any) -> list[Call]:
    """Every distinct front / attention / norm kernel call of one U-Net forward under bf16 autocast,
    as the model's layers hand them to the kernel dispatcher (the process-wide `DISPATCHER` of
    depthdif_hpc.kernels.dispatch, swapped for a recorder that runs the eager reference), with
    the module that made each call: dtypes and absent arguments are the model's own."""
    import torch
    from depthdif_hpc.kernels import dispatch as kernel_dispatch

    from depthdif_hpc.model.layers import ConvNextBlock, LinearAttention, PreNorm

    site = [""]
    site_hw: dict[str, tuple[int, int]] = {}
    calls: dict[tuple, Call] = {}

    def recorder(op: str, mode: str, *args: Any) -> Any:
        if op == "convnext_front":
            key = ("front", tuple(args[0].shape[1:]),
                   tuple(dname(a.dtype) if a is not None else None for a in args[:8]))
            extra = float(args[8]) if len(args) > 8 else 1e-5
            ref = impls("front")[1]
        elif op == "layer_norm":
            key = ("norm", tuple(args[0].shape[1:]), tuple(dname(a.dtype) for a in args[:3]))
            extra = float(args[3]) if len(args) > 3 else 1e-5
            ref = impls("norm")[1]
        elif op == "linear_attention":
            heads, d, n = args[0].shape[1:]
            key = ("attention", (heads, d, *site_hw.get(site[0], (n, 1))),
                   tuple(dname(a.dtype) for a in args[:3]))
            extra = float(args[3])
            ref = impls("attention")[1]
        else:
            raise ValueError(f"record_calls: unexpected kernel op {op!r}")
        calls.setdefault(key, Call(key[0], key[1], key[2], extra)).sites.append(site[0])
        return ref(*args)

    hooks = []
    for name, m in unet.named_modules():
        if isinstance(m, ConvNextBlock | LinearAttention | PreNorm):
            def pre(mod: Any, args: tuple, name: str = name) -> None:
                site[0] = name
                site_hw[name] = tuple(args[0].shape[-2:])
            hooks.append(m.register_forward_pre_hook(pre))
    c_dim = _coord_dim(unet)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, unet.channels, px, px, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    c = torch.randn(batch, c_dim, generator=g).to(device) if c_dim else None
    real = kernel_dispatch.DISPATCHER
    kernel_dispatch.DISPATCHER = recorder
    unet.set_kernels("triton")
    try:
        with torch.no_grad(), autocast(device):
            unet(x, t, c)
    finally:
        kernel_dispatch.DISPATCHER = real
        for h in hooks:
            h.remove()
    if not calls:
        raise RuntimeError("record_calls: the U-Net made no call through the kernel DISPATCHER")
    return list(calls.values())


def representative(calls: list[Call], by_shape: bool = False) -> list[Call]:
    """One call per kind of compiled kernel variant (the op, its absent arguments and the dtype
    of x: the first block, a regular block, the final block, attention): what the rehearsal
    runs, every code path at a fraction of the interpreter's time. `by_shape`: one per op,
    shape and dtype of x instead (absent arguments aside)."""
    seen: dict[tuple, Call] = {}
    for c in calls:
        how = c.shape if by_shape else tuple(d is None for d in c.dtypes)
        seen.setdefault((c.kind, how, c.dtypes[0]), c)
    return list(seen.values())


def _coord_dim(unet: Any) -> int | None:
    from depthdif_hpc.model.layers import ConvNextBlock

    for m in unet.modules():
        if isinstance(m, ConvNextBlock) and m.coord_mlp is not None:
            return m.coord_mlp[-1].in_features
    return None


DT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def call_inputs(call: Call, batch: int, mix: str, device: Any, seed: int = 0) -> list[Any]:
    """Leaf tensors (requires_grad) for `call` at `batch`; mix "training" keeps the recorded
    dtypes, "fp32"/"bf16" puts every tensor in that dtype. Attention q, k, v are the channel
    thirds of one qkv tensor, as the model's to_qkv(x).chunk(3) makes them; the leaf returned
    for attention is that qkv tensor."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def dt(i: int) -> Any:
        return getattr(torch, DT[call.dtypes[i] if mix == "training" else mix])

    def r(shape: tuple, i: int, std: float = 1.0, mean: float = 0.0) -> Any:
        if call.dtypes[i] is None:
            return None
        t = torch.randn(*shape, generator=g) * std + mean
        return t.to(device, dt(i)).requires_grad_(True)

    if call.kind == "front":
        C, H, W = call.shape
        return [r((batch, C, H, W), 0), r((C, 1, 7, 7), 1, 1 / 7), r((C,), 2, 0.5),
                r((batch, C), 3, 0.5), r((batch, C), 4, 0.3), r((batch, C), 5, 0.3),
                r((C,), 6, 0.2, 1.0), r((C,), 7, 0.2)]
    if call.kind == "norm":
        C, H, W = call.shape
        return [r((batch, C, H, W), 0), r((C,), 1, 0.2, 1.0), r((C,), 2, 0.2)]
    heads, d, H, W = call.shape
    return [r((batch, 3 * heads * d, H, W), 0)]


def call_fn(call: Call, impl: Callable[..., Any]) -> Callable[[list[Any]], Any]:
    """inputs -> impl's output for this call (attention: q, k, v split from the qkv leaf)."""
    if call.kind in ("front", "norm"):
        return lambda inp: impl(*inp, call.extra)
    heads, d, H, W = call.shape

    def attn(inp: list[Any]) -> Any:
        qkv = inp[0]
        q, k, v = (t.reshape(qkv.shape[0], heads, d, H * W) for t in qkv.chunk(3, dim=1))
        return impl(q, k, v, call.extra)

    return attn


EPILOGUE_IMPL = "epilogue+cl"  # the calls row of convnext_front_epilogue (channels_last)
FUSED_IMPL = "triton+cl"  # the calls row of the fused v2 front (channels_last)
# The attention kernel on q, k, v copied to contiguous (B, heads, d, N) first. On channels_last
# qkv they are views whose N stride is 3 x heads x d: the first H100 run's attention at 128 x 128
# took 4.50 ms forward + backward so, against 1.63 ms on NCHW qkv. This row says whether the
# copies (~0.8 ms estimated) buy the difference back, for LinearAttention to make them.
CONTIG_IMPL = "contig+cl"


def contiguous_attention(q: Any, k: Any, v: Any, scale: float) -> Any:
    from depthdif_hpc import kernels as K

    return K.linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), scale)


def epilogue_impl() -> Callable:
    from depthdif_hpc import kernels as K

    return K.convnext_front_epilogue


def impls(kind: str) -> tuple[Callable, Callable]:
    """(Triton kernel, eager reference) of a call kind."""
    from depthdif_hpc import kernels as K

    if kind == "front":
        return K.convnext_front, K.convnext_front_reference
    if kind == "norm":
        return K.layer_norm, K.layer_norm_reference
    return K.linear_attention, K.linear_attention_reference


def ambient_unet(plan: Plan, device: Any) -> Any:
    """The ambient preset's U-Net alone (parity, call recording)."""
    from depthdif_hpc import build_model

    cfg, _ = load_cfg(PRESETS["ambient"], plan.tiny)
    return build_model(cfg).model.to(device)


# ============================================================================ stages


@dataclass
class Ctx:
    out: Path
    work: Path
    plan: Plan
    device: Any


def stage_deps(ctx: Ctx) -> int:
    """Install the wheelhouse (make wheelhouse) offline into WORK/site, which gpu_run.sh has put
    on PYTHONPATH, when the modules the trainer needs are missing here."""
    modules = [m for m in os.environ.get("DEPS_MODULES", ",".join(TRAINER_MODULES)).split(",") if m]
    missing = [m for m in modules if module_version(m) is None]
    if not missing:
        log(f"deps: all present ({', '.join(modules)}): nothing to install")
        return 0
    wheelhouse = Path(os.environ.get("WHEELHOUSE", ROOT / ".wheelhouse"))
    wheels = sorted(wheelhouse.glob("*.whl"))
    if not wheels:
        log(f"deps: missing {missing} and no wheels in {wheelhouse} (build them with "
            "`make wheelhouse` and carry .wheelhouse): the trainer stage will fail")
        return 1
    site = ctx.work / "site"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--disable-pip-version-check", "--target", str(site), *map(str, wheels)]
    log("deps: " + " ".join(cmd[:11]) + f" <{len(wheels)} wheels>")
    r = subprocess.run(cmd, capture_output=True, text=True)
    log(r.stdout + r.stderr)
    if r.returncode != 0:
        log(f"deps: pip failed ({r.returncode})")
        return 1
    # A fresh interpreter: this one cached the state of sys.path entries before the install.
    probe = subprocess.run([sys.executable, "-c", "import " + ", ".join(missing)],
                           capture_output=True, text=True)
    ok = probe.returncode == 0
    log(f"deps: {len(wheels)} wheels installed into {site} in {time.perf_counter() - t0:.1f} s; "
        f"import {', '.join(missing)}: {'ok' if ok else 'FAILED'}\n{probe.stderr[-3000:]}")
    return 0 if ok else 1


def stage_env(ctx: Ctx) -> int:
    import numpy
    import torch
    import triton

    rows: list[tuple[str, Any]] = [
        ("mode", "rehearsal (CPU, Triton interpreter)" if ctx.plan.rehearsal else "gpu"),
        ("date_utc", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        ("commit", _commit()),
        ("host", platform.node()), ("cpus", os.cpu_count()),
        ("python", platform.python_version()), ("torch", torch.__version__),
        ("cuda", torch.version.cuda), ("triton", triton.__version__), ("numpy", numpy.__version__),
        ("triton_interpret", os.environ.get("TRITON_INTERPRET", "")),
    ]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rows += [("device", torch.cuda.get_device_name(0)), ("capability", f"{p.major}.{p.minor}"),
                 ("memory_gib", round(p.total_memory / 2**30, 1)), ("sms", p.multi_processor_count),
                 ("l2_mib", round(getattr(p, "L2_cache_size", 0) / 2**20, 1)),
                 ("cudnn", torch.backends.cudnn.version())]
        smi = _run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,"
                    "power.limit", "--format=csv,noheader"])
        rows.append(("driver, max SM MHz, max mem MHz, power limit", smi))
    else:
        rows.append(("device", f"cpu ({platform.processor() or platform.machine()})"))
    try:
        rows += _ceilings(ctx)
    except Exception as exc:  # noqa: BLE001 - the environment's rows stand without them
        rows.append(("ceilings", f"failed: {type(exc).__name__}: {exc}"))
    for mod in PACKAGES:
        v = module_version(mod)
        where = ""
        if v is not None:
            spec = importlib.util.find_spec(mod)
            origin = str(spec.origin or "") if spec else ""
            where = " (wheelhouse)" if str(ctx.work / "site") in origin else ""
        rows.append((f"pkg {mod}", f"{v}{where}" if v else "absent"))
    import depthdif_hpc.kernels as K

    rows.append(("depthdif_hpc.kernels", str(Path(K.__file__).resolve().parent)))
    rows.append(("config loader", "omegaconf" if module_version("omegaconf") else
                 "absent: YAML read onto the schema"))
    for k in ("BUDGET_S", "STAGES"):
        rows.append((k.lower(), os.environ.get(k, "")))
    for k, v in rows:
        append(ctx.out, "env", {"key": k, "value": v})
        log(f"{k:45s} {v}")
    return 0


def _ceilings(ctx: Ctx) -> list[tuple[str, Any]]:
    """What this card does at best, measured: copy bandwidth (bytes read + written) and the bf16
    matrix rate on random data (zeros can run faster), beside the datasheet's dense bf16 peak
    that MFU divides by. Timings and MFU read against these, not only against the datasheet."""
    import torch

    from depthdif_hpc.model.flops import peak_flops

    bench, dev, n = Bench(ctx.device), ctx.device, ctx.plan.ceiling_matmul_n
    copy_tb_s = _copy_rate(bench, dev, ctx.plan.ceiling_copy_mib) / 1e12
    matmul_tflop_s = _matmul_rate(bench, dev, n) / 1e12
    free_memory()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    sheet = peak_flops(name, torch.bfloat16)
    return [("copy_tb_s", float(f"{copy_tb_s:.4g}")),
            (f"bf16_matmul_{n}_tflop_s", float(f"{matmul_tflop_s:.4g}")),
            ("bf16_datasheet_tflop_s", round(sheet / 1e12, 1) if sheet else "unknown")]


def _copy_rate(bench: Bench, device: Any, mib: int) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written."""
    import torch

    src = torch.randn(mib * 2**18, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (bench(lambda: dst.copy_(src)) / 1e3)


def _matmul_rate(bench: Bench, device: Any, n: int) -> float:
    """FLOP/s of an n x n x n bf16 matrix product on random data."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / (bench(lambda: a @ b) / 1e3)


def _run(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (r.stdout.strip() or r.stderr.strip()).replace("\n", " | ")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({type(exc).__name__})"


def _commit() -> str:
    got = _run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if got and " " not in got and "fatal" not in got:
        dirty = _run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
        return got + (" (modified files)" if dirty and "unavailable" not in dirty else "")
    return os.environ.get("DD_COMMIT", "unknown (no git; pass DD_COMMIT)")


def _parity_row(ctx: Ctx, kernel: str, case: str, mix: str, tensor: str, dtype: str,
                err_k: float, err_e: float | None, tol: float | None, ok: bool,
                note: str = "") -> bool:
    append(ctx.out, "parity", {"kernel": kernel, "case": case, "mix": mix, "tensor": tensor,
                               "dtype": dtype, "err_kernel": err_k, "err_eager": err_e, "tol": tol,
                               "ok": ok, "note": note})
    if not ok:
        log(f"PARITY FAIL {kernel} {case} {mix} {tensor} ({dtype}): {err_k:.3g} vs tol {tol} {note}")
    return ok


def _guarded(ctx: Ctx, kernel: str, case: str, mix: str, fn: Callable[[], int]) -> int:
    """fn() (the number of failing tensors), or one failing 'error' row if it raises (a compile
    error, a launch failure, a failed self-check): the other cases still run."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        traceback.print_exc()
        _parity_row(ctx, kernel, case, mix, "error", "", math.nan, None, None, False,
                    f"{type(exc).__name__}: {str(exc)[:300]}")
        free_memory()
        return 1


def _op_parity(ctx: Ctx, kernel_name: str, case: str, mix: str, kernel: Callable,
               reference: Callable, inputs: list[Any], names: list[str], eager_autocast: bool) -> int:
    """Kernel vs the eager reference in fp64 on the same (rounded) inputs, output and every
    gradient; also the eager reference run as the model would run it (under autocast for the
    training mix), for scale. Tolerance: _testing.TOL of the lowest precision involved."""
    import torch
    from depthdif_hpc.kernels import no_tf32
    from depthdif_hpc.kernels._testing import TOL, poisoned_empty, rel_err

    leaves = [t for t in inputs if t is not None]
    g = torch.Generator().manual_seed(7)
    with no_tf32():  # an fp32 tensor is held to fp32's tolerance: cuDNN's TF32 is not measured
        with poisoned_empty():  # an element the kernel never writes is NaN, not a stale right value
            out = kernel(inputs)
            dy = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
            out.backward(dy)
        ref_in = [t.detach().double().requires_grad_(True) if t is not None else None for t in inputs]
        ref = reference(ref_in)
        ref.backward(dy.double())
        eag_in = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
        ctxm = autocast(ctx.device) if eager_autocast else contextlib.nullcontext()
        with ctxm:
            eag = reference(eag_in)
        eag.backward(dy.to(eag.dtype))
    tol = max(TOL[t.dtype] for t in leaves)
    bad = 0
    checks = [("out", out, ref, eag, out.dtype)]
    checks += [(f"d{n}", t.grad, r.grad, e.grad, t.dtype)
               for n, t, r, e in zip(names, inputs, ref_in, eag_in, strict=True) if t is not None]
    for tensor, got, want, eager, dtype in checks:
        if got is None:
            bad += not _parity_row(ctx, kernel_name, case, mix, tensor, dname(dtype), math.inf,
                                   None, tol, False)
            continue
        err = rel_err(got, want)
        ok = math.isfinite(err) and err <= tol
        bad += not _parity_row(ctx, kernel_name, case, mix, tensor, dname(dtype), err,
                               rel_err(eager, want) if eager is not None else None, tol, ok)
    return bad


def stage_parity(ctx: Ctx) -> int:
    """fp32, bf16 and the training mix of every kernel against its eager reference (fp64),
    forward and gradients, on every distinct call of the ambient U-Net (fronts: v1 on NCHW and
    the epilogue variant on channels_last); then the whole U-Net
    under bf16 autocast, kernels vs eager, against an fp32 reference."""
    import torch

    torch.manual_seed(0)
    plan = ctx.plan
    unet = ambient_unet(plan, ctx.device)
    calls = record_calls(unet, 1, plan.px, ctx.device)
    log(f"parity: {len(calls)} distinct kernel calls in the ambient U-Net")
    every_call = calls
    if plan.rehearsal:
        calls = representative(calls)
    bad = 0
    B = plan.parity_batch
    # Pure bf16 says nothing under the interpreter (it truncates instead of rounding): the
    # rehearsal keeps the training mix, which has both dtypes and every code path.
    for call in calls:
        kern, ref = impls(call.kind)
        names = {"front": list(FRONT_ARGS), "norm": list(NORM_ARGS)}.get(call.kind, ["qkv"])
        kname = {"front": "convnext_front", "norm": "layer_norm"}.get(call.kind,
                                                                      "linear_attention")
        # Fronts: also the epilogue variant, on the channels_last input it is chosen for.
        variants = [(kname, kern, False)]
        if call.kind == "front":
            variants.append(("convnext_front_epilogue", epilogue_impl(), True))
        for mix in plan.parity_mixes:
            for name, fn, cl in variants:
                inputs = call_inputs(call, B, mix, ctx.device, seed=len(call.sites))
                if cl:
                    inputs[0] = inputs[0].detach().contiguous(
                        memory_format=torch.channels_last).requires_grad_(True)
                case = f"{call.label} B{B}"
                bad += _guarded(ctx, name, case, mix, functools.partial(
                    _op_parity, ctx, name, case, mix, call_fn(call, fn), call_fn(call, ref),
                    inputs, names, eager_autocast=mix == "training"))
    bad += _guarded(ctx, "unet", "unet", "autocast",
                    functools.partial(_unet_autocast_parity, ctx, unet, every_call))
    log(f"parity: {bad} tensors out of tolerance")
    return 1 if bad else 0


def _unet_autocast_parity(ctx: Ctx, unet: Any, calls: list[Call]) -> int:
    """The U-Net as training runs it (fp32 parameters, bf16 autocast) with kernels, and eagerly,
    against fp32 eager without TF32. Each tensor (output, input gradient, every parameter
    gradient) must be within max(2 x the eager error, 2e-2), the rule of tests/kernels. The
    rehearsal runs it in fp32: the interpreter's bf16 truncation would be measured, not the
    kernels."""
    import torch
    from depthdif_hpc.kernels import no_tf32
    from depthdif_hpc.kernels._testing import poisoned_empty, rel_err

    B, px = ctx.plan.parity_batch, ctx.plan.unet_parity_px
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, unet.channels, px, px, generator=g).to(ctx.device)
    t = torch.randint(0, 1000, (B,), generator=g).to(ctx.device)
    c_dim = _coord_dim(unet)
    c = torch.randn(B, c_dim, generator=g).to(ctx.device) if c_dim else None
    gy = torch.randn(B, unet.out_dim, px, px, generator=g).to(ctx.device)

    def run(mode: str, amp: bool) -> dict[str, Any]:
        unet.set_kernels(mode)
        unet.zero_grad(set_to_none=True)
        xx = x.clone().requires_grad_(True)
        with contextlib.nullcontext() if amp else no_tf32():
            with autocast(ctx.device) if amp else contextlib.nullcontext():
                out = unet(xx, t, c)
            out.float().backward(gy)
        res = {"out": out.detach().float(), "d<input>": xx.grad.detach().float()}
        res |= {f"d{n}": p.grad.detach().float().clone() for n, p in unet.named_parameters()
                if p.grad is not None}
        return res

    amp = not ctx.plan.rehearsal
    ref = run("eager", False)
    eager = run("eager", amp) if amp else ref  # without autocast the same run
    case = f"unet {sum(p.numel() for p in unet.parameters())} params B{B} {px}x{px}"
    if ctx.plan.unet_parity_epilogue:
        # channels_last, and a dispatch table that sends every front of this U-Net to the
        # epilogue variant (both dtypes): the table's path through the model, and the front
        # the interpreter runs fastest.
        from depthdif_hpc.kernels import set_dispatch_table
        from depthdif_hpc.kernels.dispatch_table import FORMAT

        unet.set_channels_last(True)
        set_dispatch_table({"format": FORMAT, "device": "cpu", "entries": [
            {"op": "convnext_front", "shape": list(c.shape), "dtype": d, "layout": "channels_last",
             "compiled": False, "impl": "epilogue"}
            for c in calls if c.kind == "front" for d in ("fp32", "bf16")]})
        case += " channels_last, dispatch table: epilogue"
    with poisoned_empty():
        kern = run("triton", amp)
    mix = "autocast bf16" if amp else "fp32"
    bad = 0
    for name in ref:
        ek, ee = rel_err(kern[name], ref[name]), rel_err(eager[name], ref[name])
        tol = max(2 * ee, 2e-2)
        ok = math.isfinite(ek) and ek <= tol
        bad += not _parity_row(ctx, "unet", case, mix, name, "fp32", ek, ee, tol, ok)
    return bad


def stage_calls(ctx: Ctx, compiled: bool = False) -> int:
    """Per-call timings of every distinct front / attention / norm call of the ambient U-Net at the
    plan's batch under bf16 autocast: the Triton kernel and the eager reference (calls), or
    torch.compile of the eager reference (calls_compile). Forward and forward + backward."""
    import torch

    from depthdif_hpc.model.unet import inductor_settings

    plan = ctx.plan
    unet = ambient_unet(plan, ctx.device)
    calls = record_calls(unet, 1, plan.px, ctx.device)
    if plan.rehearsal:
        # Timings only differ by shape and x's dtype (the dispatch table's key): one call each.
        calls = representative(calls, by_shape=True)
    del unet
    free_memory()
    bench = Bench(ctx.device)
    if compiled:
        raise_recompile_limits()
    B = plan.batch
    failed = 0
    jobs: list[tuple[Call, str, Any]] = []
    # calls_compile in a command without the calls stage times the eager reference too (a fraction
    # of a second per call against ~10 s per compilation): its rows then compare within one run.
    # Whichever of the two stages runs second leaves out the eager rows the first one timed.
    timed = {(r["call"], r["impl"]) for r in read(ctx.out, "calls")}
    for call in calls:
        kern, ref = impls(call.kind)
        # "+cl": the same call on a channels_last input, as the trainer's channels_last switch
        # makes it (the front then runs its NHWC v2 kernels, cuDNN its NHWC convolutions).
        chosen = {f"{impl}{lay}": fn for lay in plan.call_layouts
                  for impl, fn in ((("eager", ref), ("compile", ref)) if compiled else
                                   (("eager", ref), ("triton", kern)))
                  if not (impl == "eager" and (call.label, impl + lay) in timed)}
        if call.kind == "front" and not compiled:
            # The front's other channels_last kernel (cuDNN's conv + the fused epilogue): the
            # dispatch table (report, dispatch_table) picks it, v2 or the reference per call.
            chosen[EPILOGUE_IMPL] = epilogue_impl()
        if call.kind == "attention" and not compiled and "+cl" in plan.call_layouts:
            chosen[CONTIG_IMPL] = contiguous_attention
        jobs += [(call, impl, fn) for impl, fn in chosen.items()]

    def run(call: Call, impl: str, fn: Any) -> int:
        """Time one implementation of one call into calls.csv; 1 if it failed."""
        if impl.startswith("compile"):  # fn: the eager reference, compiled per call and layout
            torch._dynamo.reset()
            if plan.compile_backend == "inductor":
                inductor_settings()  # as UNet.compile: the trainer's inductor
            fn = torch.compile(fn, dynamic=False, backend=plan.compile_backend)
        note, bad, host = "", 0, None
        try:
            f_ms, fb_ms = _time_call(call, fn, B, ctx.device, bench, impl.endswith("+cl"))
            host = bench.host_ms
            if bench.spread is not None:
                note = f"fwd+bwd IQR {100 * bench.spread:.1f}% of the median"
            if bench.late:
                note += f"; {bench.late} repetitions issued past the hold"
        except oom_error():
            f_ms = fb_ms = math.nan
            note = "out of memory"
        except Exception as exc:  # noqa: BLE001 - a failing impl must not hide the others
            traceback.print_exc()
            f_ms = fb_ms = math.nan
            note = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            bad = 1
        free_memory()
        append(ctx.out, "calls", {
            "kind": call.kind, "call": call.label, "sites": " ".join(call.sites),
            "per_step": len(call.sites), "batch": B, "shape": "x".join(map(str, call.shape)),
            "dtypes": call.dtype_text(), "impl": impl, "fwd_ms": f_ms, "fwdbwd_ms": fb_ms,
            "bwd_ms": fb_ms - f_ms, "host_ms": host, "note": note})
        host_text = f"  host {host:7.3f} ms" if host is not None else ""
        log(f"{call.label:44s} {impl:8s} fwd {f_ms:9.3f} ms  fwd+bwd {fb_ms:9.3f} ms{host_text}  "
            f"x{len(call.sites)} {note}")
        return bad

    if compiled:
        # Each compiled row costs a compilation (~10 s on the H100). The uncompiled rows first,
        # then the compilations: channels_last (the layout training uses) first and, within a
        # layout, the calls that weigh most in a U-Net step (eager forward + backward x calls
        # per step) first, so a stage stopped at its limit has compiled what matters most and
        # every compiled row has its baseline.
        for job in [j for j in jobs if not j[1].startswith("compile")]:
            failed += run(*job)
        weight = {(r["call"], r["impl"]): (fnum(r["fwdbwd_ms"]) or 0.0) * int(r["per_step"])
                  for r in read(ctx.out, "calls")}

        def order(job: tuple[Call, str, Any]) -> tuple[bool, float]:
            w = weight.get((job[0].label, "eager" + job[1].removeprefix("compile")), 0.0)
            return not job[1].endswith("+cl"), -(w if math.isfinite(w) else 0.0)

        jobs = sorted((j for j in jobs if j[1].startswith("compile")), key=order)
    for job in jobs:
        failed += run(*job)
    _add_speedups(ctx.out)
    return 1 if failed else 0


def _time_call(call: Call, impl: Callable, batch: int, device: Any, bench: Bench,
               channels_last: bool = False) -> tuple[float, float]:
    """(forward ms, forward + backward ms) of one implementation of a call under autocast, its
    4-D input (x, or the attention's qkv) in channels_last if asked."""
    import torch

    inputs = call_inputs(call, batch, "training", device)
    if channels_last:
        inputs[0] = inputs[0].detach().contiguous(memory_format=torch.channels_last) \
            .requires_grad_(True)
    leaves = tuple(t for t in inputs if t is not None)
    run = call_fn(call, impl)

    def fwd() -> Any:
        with autocast(device):
            return run(inputs)

    dy: list[Any] = []  # drawn at the first call, which Bench makes untimed on a GPU

    def fwdbwd() -> None:
        out = fwd()
        if not dy:
            dy.append(torch.randn_like(out))
        out.backward(dy[0])

    # bench.spread and bench.host_ms are then the forward + backward's
    return bench(fwd), bench(fwdbwd, leaves)


def calls_baseline(rows: list[dict[str, str]]) -> str:
    """The implementation speed-ups are relative to: NCHW eager, else eager on channels_last."""
    return "eager" if any(r["impl"] == "eager" for r in rows) else "eager+cl"


def _add_speedups(out: Path) -> None:
    """speedup_fwdbwd = eager fwd+bwd / this impl's, once the eager row of a call exists (NCHW
    eager; eager+cl when the plan times channels_last only)."""
    rows = read(out, "calls")
    base = calls_baseline(rows)
    eager = {r["call"]: fnum(r["fwdbwd_ms"]) for r in rows if r["impl"] == base}
    for r in rows:
        e, m = eager.get(r["call"]), fnum(r["fwdbwd_ms"])
        r["speedup_fwdbwd"] = _fmt(e / m) if e and m and not math.isnan(m) else ""
    (out / "calls.csv").unlink()
    for r in rows:
        append(out, "calls", r)


def step_dispatch_table(out: Path | None, device: Any, kernels_only: bool = False,
                        shipped_only: bool = False) -> tuple[dict | Any | None, str]:
    """The dispatch table of the "table" step modes and where it came from: this run's (its
    calls stages timed two implementations of a call or more), else the one shipped for the
    device (a command of the compile stages alone still runs the table the trainer would use),
    else none (every kernel runs). The "shipped" modes' (`shipped_only`): the shipped one, so a
    run can set this run's table beside it. The rehearsal's is `kernels_only`: the
    interpreter's kernels lose to every eager op, and a table of references would leave its
    Triton steps without a kernel."""
    from depthdif_hpc.kernels.dispatch_table import device_name, shipped_path, shipped_table

    if out is not None and not shipped_only:
        table = dispatch_table([out], kernels_only)
        if table["entries"]:
            return table, "this run's calls"
    name = device_name(device)
    shipped = shipped_table(name)
    if shipped is not None:
        return shipped, f"shipped {shipped_path(name).name}"
    return None, "none (every kernel runs)"


def _train_step(w: Workload, mode: str, plan: Plan, device: Any,
                out: Path | None = None) -> tuple[Callable[[dict], Any], str]:
    """One optimizer step as the trainer takes it: bf16 autocast, backward, clip at 1.0, AdamW
    (foreach, the trainer's optimizer), with kernels and torch.compile per `mode` (the dispatch
    table, for the "table" token, see step_dispatch_table), and a note for the step's row."""
    import torch
    from depthdif_hpc.kernels import set_dispatch_table

    tokens = check_mode(mode)
    table, source = (step_dispatch_table(out, device, plan.rehearsal, "shipped" in tokens)
                     if tokens & {"table", "shipped"} else (None, ""))
    set_dispatch_table(table)
    w.unet.set_kernels("triton" if "triton" in tokens else "eager")
    torch.backends.cudnn.benchmark = "bench" in tokens
    w.unet.set_channels_last("cl" in tokens)
    w.unet.set_activation_checkpointing("all" if "ckpt" in tokens else "none")
    if "compile" in tokens:
        raise_recompile_limits()
        w.unet.compile(dynamic=False, backend=plan.compile_backend)
    params = [p for p in w.model.parameters() if p.requires_grad]
    fused = "fused" in tokens
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=None if fused else True,
                            fused=fused or None)

    def step(batch: dict) -> Any:
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            loss = w.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return loss.detach()

    return step, f"dispatch table: {source}" if source else ""


@dataclass
class StepResult:
    batch: int
    step_ms: float
    peak_gib: float | None
    warmup_s: float
    loss_first: float
    loss_last: float
    note: str
    step: Callable[[dict], Any] | None = None
    data: dict | None = None
    workload: Workload | None = None


def measure_step(preset: str, mode: str, ctx: Ctx, start_batch: int,
                 keep: bool = False, timed: bool = True) -> StepResult:
    """Median step time at the largest batch <= start_batch that fits (halving on OOM);
    timed=False: the warm-up steps only (the profile stage times one step itself)."""
    import torch

    plan = ctx.plan
    cuda = ctx.device.type == "cuda"
    b, notes = start_batch, []
    px = plan.px
    while True:
        torch.manual_seed(0)
        w = workload(preset, plan, ctx.device, ctx.work)
        oom = False
        try:
            step, table_note = _train_step(w, mode, plan, ctx.device, ctx.out)
            data = w.make_batch(b, px)
            t0 = time.perf_counter()
            first = math.nan
            for i in range(plan.warmup_steps):
                loss = step(data)
                first = float(loss) if i == 0 else first
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            warm = time.perf_counter() - t0
            times, host, last = [], [], first
            for _ in range(plan.timed_steps if timed else 0):
                if cuda:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    h0 = time.perf_counter()
                    s.record()
                    loss = step(data)
                    e.record()
                    # The host's time to issue the step (nothing in it waits for the device):
                    # near step_ms, the step is bound by its launches, not by the device.
                    host.append((time.perf_counter() - h0) * 1e3)
                    e.synchronize()
                    times.append(s.elapsed_time(e))
                else:
                    t1 = time.perf_counter()
                    loss = step(data)
                    times.append((time.perf_counter() - t1) * 1e3)
                last = float(loss)
                first = last if math.isnan(first) else first
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            if host:
                notes.append(f"host issues a step in {statistics.median(host):.1f} ms")
            res = StepResult(b, statistics.median(times) if times else math.nan, peak, warm, first,
                             last, "; ".join(n for n in (*notes, table_note) if n))
            if keep:
                res.step, res.data, res.workload = step, data, w
            return res
        except oom_error():
            oom = True
        if oom:
            del w
            step = data = None  # noqa: F841 - drop the references the failed attempt holds
            free_memory()
            if b <= 1:
                raise RuntimeError(f"{preset} {mode}: out of memory even at batch 1")
            notes.append(f"OOM at batch {b}")
            log(f"{preset} {mode}: out of memory at batch {b}, retrying at {b // 2}")
            b //= 2


def _flops_and_mfu(model: Any, height: int, width: int, samples_per_s: float,
                   device: Any) -> tuple[float | None, float | None, str]:
    """GFLOP per training sample and MFU (bf16 dense peak) from depthdif_hpc.model.flops."""
    import torch

    try:
        from depthdif_hpc.model.flops import mfu, train_step_flops_per_sample

        fps = train_step_flops_per_sample(model, height, width)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        return fps / 1e9, mfu(samples_per_s, fps, name, torch.bfloat16), ""
    except Exception as exc:  # noqa: BLE001 - the timing stands without an MFU figure
        return None, None, f"no FLOP count: {type(exc).__name__}: {exc}"


def _step_row(ctx: Ctx, stage: str, preset: str, mode: str, r: StepResult, objective: str,
              model: Any, px: int, note: str = "") -> dict:
    sps = r.batch / (r.step_ms / 1e3)
    gflop, m, fnote = _flops_and_mfu(model, px, px, sps, ctx.device)
    row = {"stage": stage, "preset": preset, "mode": mode, "objective": objective,
           "batch": r.batch, "height": px, "width": px, "step_ms": r.step_ms, "samples_per_s": sps,
           "peak_mem_gib": r.peak_gib, "gflop_per_sample": gflop, "mfu": m,
           "warmup_s": r.warmup_s, "loss_first": r.loss_first, "loss_last": r.loss_last,
           "note": "; ".join(n for n in (r.note, fnote, note) if n)}
    append(ctx.out, "steps", row)
    mfu_text = f"MFU {100 * m:.1f}%" if m is not None else "MFU n/a"
    log(f"STEP {preset} {mode:15s} B{r.batch}: {r.step_ms:9.2f} ms  {sps:8.2f} samples/s  "
        f"peak {r.peak_gib if r.peak_gib is not None else float('nan'):6.2f} GiB  {mfu_text}  "
        f"warm-up {r.warmup_s:.1f} s  loss {r.loss_first:.4g} -> {r.loss_last:.4g}")
    return row


def stage_step(ctx: Ctx, modes: tuple[str, ...], baseline: str | None = None) -> int:
    """Whole training steps of the ambient preset per mode, at the largest batch <= 48; first
    the `baseline` mode if this run has no row of it yet (step_compile in a command of its own)."""
    if baseline and not any(r["mode"] == baseline for r in read(ctx.out, "steps")):
        modes = (baseline, *modes)
    failed = 0
    for mode in modes:
        try:
            r = measure_step("ambient", mode, ctx, ctx.plan.batch, keep=True)
            w = r.workload
            if not (math.isfinite(r.loss_first) and math.isfinite(r.loss_last)):
                failed += 1
                log(f"STEP ambient {mode}: non-finite loss")
            _step_row(ctx, "step", "ambient", mode, r, w.objective, w.model, ctx.plan.px)
        except Exception as exc:  # noqa: BLE001 - one mode failing must not hide the others
            failed += 1
            traceback.print_exc()
            append(ctx.out, "steps", {"stage": "step", "preset": "ambient", "mode": mode,
                                      "note": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
        finally:
            r = w = None
            _reset_compile()
            free_memory()
    return 1 if failed else 0


def _reset_compile() -> None:
    import torch

    torch._dynamo.reset()


def _batch_of(ctx: Ctx, preset: str, mode: str) -> int:
    """The batch an earlier stage found to fit for this preset and mode, else the plan's."""
    for r in read(ctx.out, "steps"):
        if r["preset"] == preset and r["mode"] == mode and r["stage"] in ("step", "latent") \
                and r["batch"]:
            return int(r["batch"])
    return ctx.plan.batch


# Kernel classes of the profile, in matching order (first match wins).
CLASSES = ("triton front", "triton attention", "triton norm", "optimizer", "conv", "gemm",
           "norm/reduce", "elementwise", "other")
_KEYWORDS = {
    "optimizer": ("adam", "multi_tensor", "foreach", "clip_grad"),
    "conv": ("conv", "cudnn", "fprop", "dgrad", "wgrad", "nchwtonhwc", "nhwctonchw", "depthwise",
             "winograd", "implicit_gemm"),
    "gemm": ("gemm", "nvjet", "cublas", "cutlass", "aten::mm", "aten::bmm", "aten::addmm",
             "matmul", "einsum", "triton_tem"),
    "norm/reduce": ("norm", "welford", "reduce", "softmax", "triton_red", "triton_per",
                    "aten::var", "aten::mean", "aten::sum", "aten::std"),
    "elementwise": ("elementwise", "triton_poi", "copy", "cat", "fill", "gelu", "add", "mul",
                    "div", "sub", "where", "pow", "sqrt", "neg", "exp", "clamp", "masked",
                    "index", "zero", "rand", "abs", "sin", "cos", "to_copy", "_to"),
}


def kernel_names() -> dict[str, set[str]]:
    """Names of the project's Triton kernels per class (as they appear in a GPU profile)."""
    def jit(module: str) -> set[str]:
        mod = importlib.import_module(f"depthdif_hpc.kernels.{module}")
        # @triton.jit objects (JITFunction; InterpretedFunction under the interpreter).
        return {getattr(v, "__name__", k) for k, v in vars(mod).items()
                if any(c.__name__ == "KernelInterface" for c in type(v).__mro__)}

    return {"triton front": jit("convnext_front") | jit("convnext_front_nhwc")
            | jit("convnext_epilogue"),
            "triton attention": jit("linear_attention"),
            "triton norm": jit("layer_norm")}


def classify(name: str, names: dict[str, set[str]]) -> str:
    """The class of a profiled kernel (GPU) or op (CPU rehearsal) name."""
    low = name.lower()
    # CPU profiles name the custom ops and their autograd nodes (depthdif_hpc::convnext_front_bwd,
    # GeneratedBackwardFor_depthdif_hpc_convnext_front_fwd_default); GPU profiles the kernels.
    if name in names["triton front"] or "depthdif_hpc" in low and "convnext_" in low:
        return "triton front"
    if name in names["triton norm"] or "depthdif_hpc" in low and "layer_norm" in low:
        return "triton norm"
    if name in names["triton attention"] or "depthdif_hpc" in low and "linear_attention" in low:
        return "triton attention"
    for cls in ("optimizer", "conv", "gemm", "norm/reduce", "elementwise"):
        if any(k in low for k in _KEYWORDS[cls]):
            return cls
    return "other"


def stage_profile(ctx: Ctx) -> int:
    """Device time of one training step by kernel class, eager and Triton (torch.profiler)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = ctx.device.type == "cuda"
    names = kernel_names()
    for mode in ctx.plan.profile_modes:
        r = measure_step("ambient", mode, ctx, _batch_of(ctx, "ambient", mode), keep=True,
                         timed=False)
        act = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
        with profile(activities=act) as prof:
            r.step(r.data)
            if cuda:
                torch.cuda.synchronize()
        agg = {c: [0.0, set(), ("", 0.0)] for c in CLASSES}
        for ev in prof.key_averages():
            if cuda:
                if "cuda" not in str(getattr(ev, "device_type", "")).lower():
                    continue
                us = getattr(ev, "self_device_time_total", None)
                us = us if us is not None else getattr(ev, "self_cuda_time_total", 0.0)
            else:
                us = ev.self_cpu_time_total
            if us <= 0:
                continue
            cls = classify(ev.key, names)
            a = agg[cls]
            a[0] += us
            a[1].add(ev.key)
            if us > a[2][1]:
                a[2] = (ev.key, us)
        total = sum(a[0] for a in agg.values()) or 1.0
        log(f"PROFILE ambient {mode} B{r.batch}: {total / 1e3:.2f} ms of "
            f"{'device' if cuda else 'CPU op'} time in one step")
        for cls in CLASSES:
            us, keys, top = agg[cls]
            append(ctx.out, "profile", {"mode": mode, "batch": r.batch, "class": cls,
                                        "device_ms": us / 1e3, "share": us / total,
                                        "kernels": len(keys), "top_kernel": top[0][:120]})
            log(f"   {cls:18s} {us / 1e3:9.2f} ms  {100 * us / total:5.1f}%  {len(keys):4d} names  "
                f"top: {top[0][:80]}")
        for sort in (("self_device_time_total", "self_cuda_time_total") if cuda
                     else ("self_cpu_time_total",)):
            with contextlib.suppress(Exception):
                log(prof.key_averages().table(sort_by=sort, row_limit=20, max_name_column_width=70))
                break
        r = None
        free_memory()
    return 0


def stage_latent(ctx: Ctx) -> int:
    """The latent preset's step (frozen autoencoder + 12-channel diffusion) against the pixel-
    space (ambient) step, per mode, at the batch the pixel step used."""
    failed = 0
    for mode in ctx.plan.kernel_modes:
        b = _batch_of(ctx, "ambient", mode)
        px_row = next((r for r in read(ctx.out, "steps") if r["stage"] == "step"
                       and r["mode"] == mode and r["batch"] == str(b)), None)
        try:
            if px_row is None:  # the step stage did not run: measure the pixel step here
                r = measure_step("ambient", mode, ctx, b, keep=True)
                px_row = _step_row(ctx, "step", "ambient", mode, r, r.workload.objective,
                                   r.workload.model, ctx.plan.px)
                b = r.batch
                r = None
                free_memory()
            lr = measure_step("latent", mode, ctx, b, keep=True)
            px_ms = fnum(px_row["step_ms"]) if int(px_row["batch"]) == lr.batch else None
            speed = f"{px_ms / lr.step_ms:.2f}x faster per step than pixel space (ambient, " \
                    f"{px_ms:.2f} ms at B{lr.batch})" if px_ms else "no pixel-space row at this batch"
            _step_row(ctx, "latent", "latent", mode, lr, lr.workload.objective, lr.workload.model,
                      ctx.plan.px, note=speed)
            log(f"LATENT {mode} B{lr.batch}: {speed}")
        except Exception as exc:  # noqa: BLE001
            failed += 1
            traceback.print_exc()
            append(ctx.out, "steps", {"stage": "latent", "preset": "latent", "mode": mode,
                                      "note": f"failed: {type(exc).__name__}: {str(exc)[:300]}"})
        finally:
            lr = None
            free_memory()
    return 1 if failed else 0


def stage_sample(ctx: Ctx) -> int:
    """What a reconstruction costs: `DepthDif.predict` (the path of predict and reconstruct) with
    a DDIM chain at the plan's batch and tile, per mode: ms per chain and per denoising step,
    tiles/s, peak memory, and how far each mode's reconstruction is from the fp32 eager one on
    the same noise (eta 0: the chain is deterministic, so the difference is arithmetic), in degC
    over the valid pixels. The "+bf16" modes are `predict --precision bf16`; whether predict
    should also run channels_last (it runs NCHW, with model.kernels, today) is the "cl" token's."""
    import torch

    plan = ctx.plan
    w = workload("ambient", plan, ctx.device, ctx.work)
    w.model.eval()
    batch = w.make_batch(plan.sample_batch, plan.px)
    sampler = w.model.make_sampler("ddim", ddim_num_timesteps=plan.sample_steps)
    cuda = ctx.device.type == "cuda"

    def chain(bf16: bool) -> Any:
        gen = torch.Generator(device=ctx.device).manual_seed(3)
        return w.model.predict(batch, sampler=sampler, generator=gen,
                               precision="bf16" if bf16 else "fp32").y_hat_denorm

    ref = None
    failed = 0
    for mode in plan.sample_modes:
        tokens = set(mode.split("+"))
        bf16 = "bf16" in tokens
        note = ""
        try:
            w.unet.set_kernels("triton" if "triton" in tokens else "eager")
            w.unet.set_channels_last("cl" in tokens)
            free_memory()
            if cuda:
                torch.cuda.reset_peak_memory_stats(ctx.device)
            t0 = time.perf_counter()
            out = chain(bf16)  # warm-up: Triton compilation, kernel self-checks, cuDNN plans
            if cuda:
                torch.cuda.synchronize()
            warm = time.perf_counter() - t0
            times = []
            for _ in range(plan.timed_steps if plan.rehearsal else 2):
                t0 = time.perf_counter()
                out = chain(bf16)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1e3
            peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None
            if ref is None:
                ref = out
            valid = torch.isfinite(ref) & torch.isfinite(out)
            diff = (out - ref)[valid].abs()
            note = (f"{ms / plan.sample_steps:.2f} ms per denoising step; vs {plan.sample_modes[0]} "
                    f"fp32: max |diff| {diff.max().item():.3g} degC, RMS "
                    f"{diff.square().mean().sqrt().item():.3g} degC")
            if not bool(torch.isfinite(out).any()):
                note += "; PROBLEM: no finite value"
                failed += 1
            row = {"step_ms": ms, "samples_per_s": plan.sample_batch / (ms / 1e3),
                   "peak_mem_gib": peak, "warmup_s": warm}
        except oom_error():
            row, note = {}, "out of memory"
        except Exception as exc:  # noqa: BLE001 - one failing mode must not hide the others
            traceback.print_exc()
            row, note = {}, f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            failed += 1
        append(ctx.out, "steps", {
            "stage": "sample", "preset": "ambient", "mode": mode,
            "objective": f"DepthDif.predict, DDIM {plan.sample_steps} steps", "batch": plan.sample_batch,
            "height": plan.px, "width": plan.px, "gflop_per_sample": None, "mfu": None,
            "loss_first": None, "loss_last": None, "note": note, **row})
        log(f"sample {mode:16s} B{plan.sample_batch}: {row.get('step_ms', math.nan):9.1f} ms per chain  {note}")
    w.unet.set_channels_last(False)
    return 1 if failed else 0


GPU_TESTS = "pytest -m gpu"  # parity.csv's `kernel` of the gpu_tests stage's rows
GPU_TEST_PATHS = ("benchmarks", "tests/kernels", "tests/data/test_stream.py")
FAILURE_LOG_VAR = "DD_PYTEST_FAILURE_LOG"  # where the repository conftest logs each failure
PROGRESS_LOG_VAR = "DD_PYTEST_PROGRESS_LOG"  # and each test's start and phase durations


def split_gpu_tests(rows: list[dict[str, str]]) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """parity.csv's rows: (the op and U-Net parity, the gpu_tests stage's: summary first)."""
    tests = [r for r in rows if r["kernel"] == GPU_TESTS]
    tests.sort(key=lambda r: r["case"] != "(summary)")
    return [r for r in rows if r["kernel"] != GPU_TESTS], tests


def pytest_outcomes(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """From `pytest -v -rfE` output: {test id: PASSED | FAILED | ...} as the tests ran, and
    {test id: message} from the closing summary of failures and errors."""
    states = "PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS"
    outcome = dict(re.findall(rf"^(\S+::\S+) ({states})\b", text, re.M))
    # pytest-xdist prints the outcome first: "[gw0] [ 50%] PASSED path::test"
    outcome |= {t: o for o, t in re.findall(rf"^\[gw\d+\] \[\s*\d+%\] ({states}) (\S+::\S+)",
                                            text, re.M)}
    why = dict(re.findall(r"^(?:FAILED|ERROR) (\S+::\S+) - (.*)$", text, re.M))
    return outcome, why


def failure_lines(text: str) -> dict[str, str]:
    """{test id: its first "E " line} from the failure log the repository conftest writes."""
    why = {}
    for block in text.split("===== ")[1:]:
        head, _, body = block.partition("\n")
        first = next((ln[1:].strip() for ln in body.splitlines() if ln.startswith("E ")), "")
        why.setdefault(head.rsplit(" (", 1)[0], first)
    return why


def pytest_progress(text: str) -> tuple[list[str], dict[str, float]]:
    """From the repository conftest's progress log: (the tests started but not finished, in
    the order they started; {finished test: seconds over its phases})."""
    started: dict[str, None] = {}
    seconds: dict[str, float] = {}
    done: set[str] = set()
    for line in text.splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue  # a line cut by the stop
        what, secs, nodeid = parts
        if what == "start":
            started[nodeid] = None
            continue
        seconds[nodeid] = seconds.get(nodeid, 0.0) + float(secs)
        if what == "teardown":
            done.add(nodeid)
    return [n for n in started if n not in done], {n: seconds[n] for n in done}


def stage_gpu_tests(ctx: Ctx) -> int:
    """The suite's CUDA-only tests (`pytest -m gpu`: every kernel's parity at odd shapes and
    tails, in each dtype, against the fp32 reference; 183 of them, skipped on CPUs) on the
    device. Rows in parity.csv (kernel "pytest -m gpu"): a summary, then each failure. pytest
    gets the stage's limit less 15 s; a run stopped there keeps the outcomes it printed."""
    limit = float(os.environ.get("STAGE_LIMIT_S", "150"))
    text_path = ctx.work / "gpu_tests.txt"
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-m", "gpu", "-p", "no:cacheprovider",
           *GPU_TEST_PATHS]
    if ctx.plan.gpu_test_workers and importlib.util.find_spec("xdist") is not None:
        # The tests are mostly Triton compilations (a cold cache: this stage may run first):
        # worker processes compile side by side on the machine's cores.
        # worksteal: test by test (the repository conftest otherwise hands workers whole files).
        cmd += ["-n", str(ctx.plan.gpu_test_workers), "--dist", "worksteal"]
    log("gpu_tests: " + " ".join(cmd))
    # Tracebacks as the failures happen (the repository conftest writes them), for log.txt:
    # pytest's own report comes at the end, which a run stopped at the limit never reaches.
    failures = ctx.work / "gpu_test_failures.txt"
    failures.unlink(missing_ok=True)
    progress = ctx.work / "gpu_test_progress.txt"
    progress.unlink(missing_ok=True)
    env = {**os.environ, FAILURE_LOG_VAR: str(failures), PROGRESS_LOG_VAR: str(progress)}
    t0 = time.perf_counter()
    stopped = False
    with text_path.open("w") as f:
        try:
            subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                           timeout=max(limit - 15, 5))
        except subprocess.TimeoutExpired:
            stopped = True
    wall = time.perf_counter() - t0
    text = text_path.read_text(errors="replace")
    tracebacks = failures.read_text(errors="replace") if failures.exists() else ""
    outcome, why = pytest_outcomes(text)
    why = failure_lines(tracebacks) | why
    counts = {k: sum(v == k for v in outcome.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    bad = [n for n, v in outcome.items() if v in ("FAILED", "ERROR")]
    collect_error = "errors during collection" in text or "ERROR collecting" in text
    running, seconds = pytest_progress(progress.read_text(errors="replace")
                                       if progress.exists() else "")
    items = re.findall(r"(?:\[(\d+) items?\]|collected (\d+) items?)", text)
    total = int(next((a or b for a, b in items), 0) or 0)
    unstarted = total - len(seconds) - len(running) if total else 0
    stop_text = ""
    if stopped:
        parts = ["stopped at the stage's limit"]
        if running:
            parts.append("running: " + ", ".join(running[:4]) + (" ..." if len(running) > 4 else ""))
        if unstarted > 0:
            parts.append(f"{unstarted} of {total} not started")
        stop_text = f" ({'; '.join(parts)})"
    note = (f"{counts['PASSED']} passed, {counts['FAILED']} failed, {counts['ERROR']} errors, "
            f"{counts['SKIPPED']} skipped in {wall:.0f} s" + stop_text
            + ("; collection errors (log.txt)" if collect_error else ""))
    ok = not bad and not stopped and not collect_error and outcome
    row = {"kernel": GPU_TESTS, "mix": "pytest", "tensor": "", "dtype": "", "err_kernel": None,
           "err_eager": None, "tol": None}
    append(ctx.out, "parity", {**row, "case": "(summary)", "ok": "yes" if ok else "no", "note": note})
    for n in bad:
        append(ctx.out, "parity", {**row, "case": n, "ok": "no", "note": why.get(n, outcome[n])[:300]})
    slow = sorted(seconds.items(), key=lambda kv: -kv[1])[:12]
    if slow:  # what to cut or split when the stage does not fit its limit
        print("slowest tests (s, setup + call + teardown):\n"
              + "\n".join(f"{v:8.1f}  {n}" for n, v in slow))
    print(text[-6000:])  # log.txt: pytest's last lines (its summary, when it got there)
    if tracebacks:
        print("===== tracebacks, as the failures happened\n" + tracebacks[:40000])
    log(f"GPU TESTS: {note}")
    return 0 if ok else 1


def trainer_command(store: Path, run_dir: Path, plan: Plan, batch: int, steps: int,
                    launch: str = "zero2") -> list[str]:
    """The real entry point, ambient preset, bf16 (fp32 on the CPU), under DeepSpeed ZeRO-2
    (`launch` "zero2") or DDP ("ddp", the preset's own)."""
    cfgs = [a for f in (*PRESETS["ambient"], DATA_CONFIG) for a in ("--config", f)]
    dist = (["trainer.distributed=deepspeed", "trainer.deepspeed_config=configs/deepspeed/zero2.json"]
            if launch == "zero2" else ["trainer.distributed=ddp"])
    over = [f"dataset.store={store}", f"trainer.run_dir={run_dir}", "trainer.resume=none", *dist,
            f"trainer.precision={'fp32' if plan.rehearsal else 'bf16'}",
            f"trainer.max_steps={steps}", f"dataloader.batch_size={batch}",
            f"trainer.log_every_n_steps={max(1, steps // 10)}",
            "trainer.val_every_n_steps=100000000",
            "trainer.val_at_epoch_end=false", "trainer.checkpoint_every_n_steps=100000000",
            "trainer.full_reconstruction=false", "trainer.progress_bar=false",
            # A short run from scratch: the preset's 2000-step warm-up would keep the learning
            # rate at ~1/5 for all of it, so the loss could not be seen to fall.
            "scheduler.warmup.enabled=false"]
    if plan.rehearsal:
        # A width-8 U-Net learns fast enough at 1e-3 for 10 steps to show a falling loss; one
        # thread makes that run the same on every machine.
        over += ["dataloader.num_workers=0", "training.lr=1e-3", "trainer.intra_op_threads=1",
                 *_dotted(plan.tiny)]
    else:
        over += ["dataloader.num_workers=6"]
    if plan.trainer_compile:
        over += ["trainer.compile=true", f"trainer.compile_backend={plan.compile_backend}"]
    return [sys.executable, "-m", "depthdif_hpc.train", *cfgs, *over]


def stage_trainer(ctx: Ctx) -> int:
    """A synthetic store, then `python -m depthdif_hpc.train` (ambient preset, bf16) for a few
    dozen steps under each of `plan.trainer_launches` (DeepSpeed ZeRO-2, then the preset's DDP):
    steps/s, a finite and falling loss, a checkpoint written."""
    plan = ctx.plan
    from depthdif_hpc.data.store import read_manifest
    from depthdif_hpc.data.synthetic import build_tiny_store

    t0 = time.perf_counter()
    start, end = plan.trainer_dates
    store = build_tiny_store(ctx.work / "trainer_data", tile_size=plan.trainer_tile, start=start,
                             end=end, workers=min(8, os.cpu_count() or 1))
    n_train = read_manifest(store)["splits"]["train"]["n_samples"]
    log(f"trainer: store {store} ({n_train} training samples, {plan.trainer_tile} px) "
        f"in {time.perf_counter() - t0:.1f} s")
    batch = min(int(os.environ.get("TRAINER_BATCH", plan.trainer_batch)), n_train)
    fit = _batch_of(ctx, "ambient", ctx.plan.kernel_modes[1])
    if fit < plan.batch:  # the step stage ran out of memory above `fit`: so would the trainer
        batch = min(batch, fit)
    steps = int(os.environ.get("TRAINER_STEPS", plan.trainer_steps))
    failed = 0
    for i, launch in enumerate(plan.trainer_launches):
        failed += _trainer_run(ctx, store, n_train, batch, steps, launch)
        if i == 0:  # the first run's checkpoint through the inference entry point
            failed += _predict_run(ctx, store, ctx.work / f"trainer_run_{launch}")
    return 1 if failed else 0


def _predict_run(ctx: Ctx, store: Path, run_dir: Path) -> int:
    """`python -m depthdif_hpc.inference.predict` on the run's final checkpoint (the inference entry point
    as a user runs it: checkpoint loading, DDIM ensemble, the prediction store): every sample of
    the val split marked done, a finite mean where the target is valid. Row: stage "predict"."""
    import numpy as np

    from depthdif_hpc.inference.writer import PredictionWriter

    plan = ctx.plan
    out = ctx.work / "predict.zarr"
    steps, members = plan.predict_ddim_steps, 2
    cmd = [sys.executable, "-m", "depthdif_hpc.inference.predict", "--checkpoint", str(run_dir),
           "--store", str(store), "--split", "val", "--out", str(out), "--sampler", "ddim",
           "--steps", str(steps), "--ensemble", str(members), "--batch-size", "4"]
    if plan.rehearsal:
        cmd += ["--limit", "1"]
    log("predict: " + " ".join(cmd))
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.perf_counter() - t0
    problems = [] if rc == 0 else [f"exit {rc}"]
    n = 0
    if out.exists():
        w = PredictionWriter(out)
        done = w.done()
        n = int(done.sum())
        if not done.all():
            problems.append(f"{n} of {done.size} samples done")
        mean = np.asarray(w.group["mean"][:])
        if not np.isfinite(mean).any():
            problems.append("no finite value in the mean")
    else:
        problems.append("no prediction store")
    note = (f"{n} val samples x {members} members, DDIM {steps} steps, process {wall:.0f} s"
            + ("; PROBLEMS: " + "; ".join(problems) if problems else ""))
    append(ctx.out, "steps", {
        "stage": "predict", "preset": "ambient", "mode": "cli",
        "objective": "python -m depthdif_hpc.inference.predict", "batch": 4, "height": plan.trainer_tile,
        "width": plan.trainer_tile, "step_ms": wall * 1e3 / max(n, 1),
        "samples_per_s": n / wall if wall > 0 else None, "peak_mem_gib": None,
        "gflop_per_sample": None, "mfu": None, "warmup_s": None, "loss_first": None,
        "loss_last": None, "note": note})
    log(f"PREDICT: {note}")
    return 1 if problems else 0


def _trainer_run(ctx: Ctx, store: Path, n_train: int, batch: int, steps: int, launch: str) -> int:
    """One trainer process under `launch`; its row in steps.csv (mode: launch, +compile)."""
    plan = ctx.plan
    run_dir = ctx.work / f"trainer_run_{launch}"
    cmd = trainer_command(store, run_dir, plan, batch, steps, launch)
    mode = launch + ("+compile" if plan.trainer_compile else "")
    log(f"trainer ({mode}): " + " ".join(cmd))
    t1 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    wall = time.perf_counter() - t1
    recs = []
    steplog = run_dir / "steps.jsonl"
    if steplog.exists():
        recs = [json.loads(line) for line in steplog.read_text().splitlines() if line.strip()]
    problems = [] if rc == 0 else [f"exit {rc}"]
    losses = [float(r["loss"]) for r in recs]
    if len(recs) != steps:
        problems.append(f"{len(recs)} of {steps} steps logged")
    if not losses or not all(math.isfinite(v) for v in losses):
        problems.append("non-finite loss")
    k = max(2, len(losses) // 5)
    first, last = (statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])) if losses else (math.nan,) * 2
    if not last < first:
        problems.append(f"loss did not fall (mean of first {k} {first:.4g}, last {k} {last:.4g})")
    ckpts = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir() and any(p.iterdir()))
    if not ckpts or not ckpts[-1].name.endswith(f"{steps:08d}"):
        problems.append(f"no checkpoint of step {steps} ({[p.name for p in ckpts]})")
    # Throughput from the trainer's own log windows (every trainer.log_every_n_steps steps a
    # record carries step_time_s, samples_per_s, peak_mem_gib and, on a known GPU, mfu), the
    # first window left out: Triton compile, kernel self-checks, cuDNN autotuning, loader start.
    windows, prev = [], 0
    for r in recs:
        if "step_time_s" in r:
            windows.append((int(r["step"]) - prev, r))
            prev = int(r["step"])
    timed = windows[1:] or windows
    secs = sum(n * float(r["step_time_s"]) for n, r in timed)
    steps_timed = sum(n for n, _ in timed)
    step_s = secs / steps_timed if steps_timed else math.nan
    sps = sum(n * float(r["step_time_s"]) * float(r["samples_per_s"]) for n, r in timed) / secs \
        if secs else math.nan
    peak = max((float(r.get("peak_mem_gib") or 0) for _, r in windows), default=None)
    wait = sum(n * float(r.get("data_wait_s_per_step", 0)) for n, r in timed) / secs if secs else math.nan
    mfus = [float(r["mfu"]) for _, r in timed if r.get("mfu") is not None]
    if not windows:
        problems.append("no throughput record in steps.jsonl")
    gflop, m, fnote = None, (statistics.fmean(mfus) if mfus else None), ""
    if math.isfinite(sps):
        with contextlib.suppress(Exception):
            w = workload("ambient", plan, _cpu(), ctx.work)
            gflop, m2, fnote = _flops_and_mfu(w.model, plan.trainer_tile, plan.trainer_tile, sps,
                                              ctx.device)
            m = m if m is not None else m2
    # The store is small (96 samples on a GPU: its build is paid in device time), so an epoch is
    # a few steps and each starts with an empty loader pipeline: the data wait counts those.
    per_epoch = math.ceil(n_train / batch)
    note = (f"{'deepspeed zero2' if launch == 'zero2' else 'ddp'}, {'fp32' if plan.rehearsal else 'bf16'}, "
            f"{1 / step_s:.3f} steps/s, "
            f"data wait {100 * wait:.1f}% ({per_epoch} steps per epoch), process {wall:.0f} s, checkpoint "
            f"{ckpts[-1].name if ckpts else 'none'}" + (f"; {fnote}" if fnote else "")
            + ("; PROBLEMS: " + "; ".join(problems) if problems else ""))
    append(ctx.out, "steps", {
        "stage": "trainer", "preset": "ambient", "mode": mode, "objective":
        "python -m depthdif_hpc.train", "batch": batch, "height": plan.trainer_tile,
        "width": plan.trainer_tile, "step_ms": step_s * 1e3, "samples_per_s": sps,
        "peak_mem_gib": peak, "gflop_per_sample": gflop, "mfu": m, "warmup_s": None,
        "loss_first": first, "loss_last": last, "note": note})
    log(f"TRAINER {mode} B{batch}: {1 / step_s:.3f} steps/s, {sps:.2f} samples/s, loss {first:.4g} -> "
        f"{last:.4g}, {note}")
    return 1 if problems else 0


def _cpu() -> Any:
    import torch

    return torch.device("cpu")


# ============================================================================ report


def stage_report(out: Path, summary: Path) -> int:
    """report.md from the CSVs, and headline lines appended to summary.txt (printed last)."""
    env = {r["key"]: r["value"] for r in read(out, "env")}
    stage_lines = summary.read_text().splitlines() if summary.exists() else []
    heads = headlines(out)
    md = [f"# GPU run: {env.get('device', '?')}", "",
          f"{env.get('mode', '?')}; torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, "
          f"triton {env.get('triton', '?')}, Python {env.get('python', '?')}; commit "
          f"{env.get('commit', '?')}; {env.get('date_utc', '?')}", "", "## Stages", "", "```",
          *stage_lines, "```", "", "## Headlines", "", *[f"* {h}" for h in heads], ""]
    md += _md_section("Environment", read(out, "env"), ["key", "value"])
    parity, tests = split_gpu_tests(read(out, "parity"))
    failed = [r for r in parity if r["ok"] != "yes"]
    worst = sorted((r for r in parity if r["kernel"] != "unet"),
                   key=lambda r: -(fnum(r["err_kernel"]) or 0) / (fnum(r["tol"]) or 1))[:15]
    md += _md_section(f"Parity: {len(parity) - len(failed)} of {len(parity)} tensors within "
                      "tolerance; failures", failed, TABLES["parity"])
    md += _md_section("Parity: the 15 op tensors closest to their tolerance", worst, TABLES["parity"])
    if tests:
        md += _md_section("pytest -m gpu (the summary, then each failure)", tests, ["case", "ok", "note"])
    md += _md_section("Per-call timings (ms, median, L2 flushed; the device's time, host_ms the "
                      "host's to issue the forward + backward)", read(out, "calls"),
                      ["call", "per_step", "batch", "dtypes", "impl", "fwd_ms", "fwdbwd_ms",
                       "host_ms", "speedup_fwdbwd", "note"])
    table = dispatch_table([out])
    md += ["## Dispatch table (per call: kernel, epilogue front or reference; eager and compiled)",
           "", "Written to a file by `python benchmarks/gpu_stages.py dispatch_table --out <this "
           "folder>` (docs/gpu_run.md); used through DEPTHDIF_DISPATCH_TABLE.", "", "```json",
           json.dumps(table, indent=1), "```", ""]
    md += _md_section("Training steps", read(out, "steps"),
                      ["stage", "preset", "mode", "batch", "step_ms", "samples_per_s",
                       "peak_mem_gib", "gflop_per_sample", "mfu", "warmup_s", "loss_first",
                       "loss_last", "note"])
    md += _md_section("Device time of one step by kernel class", read(out, "profile"),
                      TABLES["profile"])
    (out / "report.md").write_text("\n".join(md) + "\n")
    with summary.open("a") as f:
        f.write("".join(f"{h}\n" for h in heads))
    return 0


def _md_section(title: str, rows: list[dict[str, str]], cols: list[str]) -> list[str]:
    lines = [f"## {title}", ""]
    if not rows:
        return lines + ["(none)", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "").replace("|", "/") for c in cols) + " |" for r in rows]
    return lines + [""]


def headlines(out: Path) -> list[str]:
    """The few numbers worth quoting, from whatever the stages wrote."""
    lines = []
    parity, tests = split_gpu_tests(read(out, "parity"))
    if tests:
        lines.append(f"GPU TESTS pytest -m gpu: {'OK' if all(r['ok'] == 'yes' for r in tests) else 'FAIL'}: "
                     + tests[0]["note"])
    if parity:
        bad = [r for r in parity if r["ok"] != "yes"]
        mixes = sorted({r["mix"] for r in parity})
        lines.append(f"PARITY {'OK' if not bad else 'FAIL'}: {len(parity) - len(bad)}/{len(parity)} "
                     f"tensors within tolerance ({', '.join(mixes)})"
                     + (f"; failing: {sorted({r['case'] + ' ' + r['mix'] for r in bad})[:5]}" if bad else ""))
    calls = read(out, "calls")
    if calls:
        lines.append(calls_headline(calls))
    env = {r["key"]: r["value"] for r in read(out, "env")}
    mm_key = next((k for k in env if k.startswith("bf16_matmul_")), None)
    matmul = fnum(env.get(mm_key)) if mm_key else None
    if matmul is not None:
        lines.append(f"CEILINGS copy {env.get('copy_tb_s')} TB/s (read + write), "
                     f"{mm_key.removeprefix('bf16_matmul_').removesuffix('_tflop_s')}^3 bf16 "
                     f"matmul {matmul:g} TFLOP/s, datasheet dense bf16 "
                     f"{env.get('bf16_datasheet_tflop_s')} TFLOP/s (MFU's denominator)")
    table = dispatch_table([out])
    if table["entries"]:
        lines.append(f"DISPATCH TABLE ({table['device']}): {table_summary(table)}")
    for r in read(out, "steps"):
        m = fnum(r["mfu"])
        tag = {"step": "STEP", "latent": "LATENT", "trainer": "TRAINER", "sample": "SAMPLE",
               "predict": "PREDICT"}.get(r["stage"], r["stage"])
        if r["stage"] == "predict":
            lines.append(f"{tag} {r['objective']}: {r['note']}")
            continue
        peak = fnum(r["peak_mem_gib"])
        ms, sps = fnum(r["step_ms"]), fnum(r["samples_per_s"])
        if ms is None or sps is None:
            lines.append(f"{tag} {r['preset']} {r['mode']}: {r['note']}")
            continue
        if r["stage"] == "sample":
            lines.append(f"{tag} {r['preset']} {r['mode']} B{r['batch']}: {r['objective']}: "
                         f"{ms:.1f} ms per chain, {sps:.2f} tiles/s"
                         + (f", peak {peak:.1f} GiB" if peak is not None else "") + f"; {r['note']}")
            continue
        lines.append(f"{tag} {r['preset']} {r['mode']} B{r['batch']}: {ms:.2f} ms/step, "
                     f"{sps:.2f} samples/s"
                     + (f", peak {peak:.1f} GiB" if peak is not None else "")
                     + (f", MFU {100 * m:.1f}%" if m is not None else "")
                     + (f"; {r['note']}" if r["note"] else ""))
    prof = read(out, "profile")
    for mode in dict.fromkeys(r["mode"] for r in prof):
        rows = sorted((r for r in prof if r["mode"] == mode), key=lambda r: -(fnum(r["share"]) or 0))
        lines.append(f"PROFILE {mode}: " + ", ".join(
            f"{r['class']} {100 * (fnum(r['share']) or 0):.0f}%" for r in rows if fnum(r["share"])))
    return lines


def calls_headline(calls: list[dict[str, str]]) -> str:
    """Per-U-Net totals (fwd + bwd x calls per forward) that compare like with like.

    An implementation measured on every call gets its total and its speed-up over eager; the
    dispatch table's channels_last choices (`table+cl`: per call the fastest of the kernels and
    the eager reference; `table+compile+cl`: of the kernels and the compiled reference) are
    what training with the table runs, less what inductor fuses across calls. An
    implementation measured on part of the calls (the epilogue exists for fronts only; a stage
    stopped at its limit leaves the rest unmeasured) is compared with eager on that part only:
    the first H100 run summed two compiled calls against all 25 eager ones and printed 14.6x.
    """
    per: dict[str, dict[str, float]] = {}
    weight: dict[str, int] = {}
    for r in calls:
        v = fnum(r["fwdbwd_ms"])
        if v is not None and math.isfinite(v):
            per.setdefault(r["impl"], {})[r["call"]] = v
            weight[r["call"]] = int(r["per_step"])
    every = list(dict.fromkeys(r["call"] for r in calls))
    base = calls_baseline(calls)
    eager = per.get(base, {})
    timings = table_timings(calls)
    for name, compiled, needs in (("table+cl", False, FUSED_IMPL), ("table+compile+cl", True, "compile+cl")):
        if needs in per:
            per[name] = {r["call"]: min(timings[key].values()) for r in calls
                         if r["impl"] == needs and (key := table_key(r, compiled)) is not None}

    def total(impl: str, subset: list[str]) -> float:
        return sum(per[impl][c] * weight[c] for c in subset)

    full, partial = [], []
    for impl, got in per.items():
        subset = [c for c in every if c in got]
        if len(subset) == len(every):
            t = total(impl, subset)
            e = total(base, subset) if len(eager) == len(every) else None
            full.append(f"{impl} {t:.2f} ms" + (f" ({e / t:.2f}x)" if e and impl != base else ""))
        else:
            both = [c for c in subset if c in eager]
            t = total(impl, both)
            e = total(base, both) if both else 0.0
            partial.append(f"{impl} on {len(subset)} of {len(every)} calls: {t:.2f} ms vs {base} {e:.2f} ms"
                           + (f" ({e / t:.2f}x)" if t > 0 and e > 0 else ""))
    head = f"CALLS fronts+attention+norms per U-Net fwd+bwd at B{calls[0]['batch']} ({len(every)} calls): "
    return head + ", ".join(full) + ("; " + "; ".join(partial) if partial else "")


# calls.csv implementation -> (layout, the contexts it stands for, the table's implementation;
# None: the op's kernel, "fused" for a front). A kernel is opaque to inductor, so its time
# stands for both contexts; the eager reference's time is its time outside torch.compile, the
# compiled reference's inside (inductor's code for it).
TABLE_ROWS: dict[str, tuple[str, tuple[bool, ...], str | None]] = {
    "triton": ("nchw", (False, True), None),
    FUSED_IMPL: ("channels_last", (False, True), None),
    EPILOGUE_IMPL: ("channels_last", (False, True), "epilogue"),
    "eager": ("nchw", (False,), "reference"),
    "eager+cl": ("channels_last", (False,), "reference"),
    "compile": ("nchw", (True,), "reference"),
    "compile+cl": ("channels_last", (True,), "reference"),
}
TABLE_OPS = {"front": "convnext_front", "norm": "layer_norm", "attention": "linear_attention"}


def table_key(r: dict[str, str], compiled: bool) -> tuple | None:
    """The dispatch table's key (kernels/dispatch_table.py) of a calls row in one context, or
    None for a row the table does not choose between (contig+cl)."""
    if r["impl"] not in TABLE_ROWS or compiled not in TABLE_ROWS[r["impl"]][1]:
        return None
    sizes = [int(n) for n in r["shape"].split("x")]
    shape = (sizes[0], sizes[1], sizes[2] * sizes[3]) if r["kind"] == "attention" else tuple(sizes)
    dtype = r["dtypes"].split()[0].split("=")[1]
    return (TABLE_OPS[r["kind"]], shape, dtype, TABLE_ROWS[r["impl"]][0], compiled)


def launch_timed(r: dict[str, str]) -> bool:
    """Whether a calls row comes from a run before Bench held the device (no host_ms column):
    its time of a call small on the device is the host's time to launch it."""
    return "host_ms" not in r


def table_timings(calls: list[dict[str, str]]) -> dict[tuple, dict[str, float]]:
    """Per table key, forward + backward ms of each implementation the rows timed (a later row
    of the same key and implementation replaces an earlier one).

    A launch-timed row (`launch_timed`) of an eager reference is left out: outside
    torch.compile such rows measured the host, and the reference launches fewer, cheaper torch
    ops than our Triton launches, so it "won" at most calls of 32^2 and less; a training step
    hides that launch time behind the device's queue. On the H100 the step whose table took 5
    such references (and 2 norms, 2 attentions) ran 132.08 ms, the one whose table chose only
    among the front kernels 121.75 ms (docs/gpu_run.md, Measured on GPUs). Compiled rows stay:
    the step with their choices (16 references of 22) beat the kernels-only one, 101.49 against
    104.78 ms."""
    from depthdif_hpc.kernels.dispatch_table import default_impl

    ms: dict[tuple, dict[str, float]] = {}
    for r in calls:
        v = fnum(r["fwdbwd_ms"])
        if v is None or not math.isfinite(v):
            continue
        for compiled in (False, True):
            key = table_key(r, compiled)
            impl = TABLE_ROWS[r["impl"]][2] if key is not None else None
            if key is None or (impl == "reference" and not compiled and launch_timed(r)):
                continue
            ms.setdefault(key, {})[impl or default_impl(key[0])] = v
    return ms


def dispatch_table(outs: list[Path], kernels_only: bool = False) -> dict:
    """The dispatch table (kernels/dispatch_table.py) from the calls.csv of one or more results
    folders of one kind of GPU (a later folder's timing of a call replaces an earlier one's):
    per call and context, the implementation with the least forward + backward time among
    those timed (`kernels_only`: among the kernels); a call with fewer than two timed is left
    out (its kernel runs). Validated by the kernels' own parser before it is returned."""
    from depthdif_hpc.kernels import DispatchTable
    from depthdif_hpc.kernels.dispatch_table import FORMAT

    devices, sources, calls = [], [], []
    for out in outs:
        env = {r["key"]: r["value"] for r in read(out, "env")}
        # The name the kernels compare with (dispatch_table.device_name): the CUDA device's, or "cpu".
        devices.append("cpu" if env.get("mode", "").startswith("rehearsal") else env.get("device", "?"))
        rows = read(out, "calls")
        calls += rows
        sources.append(f"{out / 'calls.csv'} (commit {env.get('commit', '?')}, "
                       f"{env.get('date_utc', '?')}, batch {rows[0]['batch'] if rows else '?'})")
    if len(set(devices)) > 1:
        raise ValueError("dispatch_table: the results were measured on different devices: "
                         + ", ".join(f"{o}: {d}" for o, d in zip(outs, devices, strict=True)))
    entries = []
    for (op, shape, dtype, layout, compiled), t in sorted(table_timings(calls).items()):
        if kernels_only:
            t = {k: v for k, v in t.items() if k != "reference"}
        if len(t) >= 2:
            entries.append({"op": op, "shape": list(shape), "dtype": dtype, "layout": layout,
                            "compiled": compiled, "impl": min(t, key=t.__getitem__),
                            "ms": {k: round(v, 4) for k, v in sorted(t.items())}})
    table = {"format": FORMAT, "device": devices[0] if devices else "?",
             "source": "; ".join(sources) + "; forward + backward, bf16 autocast",
             "entries": entries}
    DispatchTable.from_dict(table)  # what the kernels will load
    return table


def table_summary(table: dict) -> str:
    """How often the table picks each implementation, per context."""
    parts = []
    for compiled in (False, True):
        got = [e["impl"] for e in table["entries"] if e["compiled"] == compiled]
        if got:
            counts = ", ".join(f"{impl} {got.count(impl)}" for impl in sorted(set(got)))
            parts.append(f"{'inside' if compiled else 'outside'} torch.compile: {counts} of {len(got)}")
    return "; ".join(parts)


def write_dispatch_table(outs: list[Path], path: Path) -> int:
    """`dispatch_table`: write the table of the results in `outs` to `path` (a temporary, then a rename)."""
    table = dispatch_table(outs)
    if not table["entries"]:
        log(f"dispatch_table: no call of {[str(o) for o in outs]} has two implementations timed")
        return 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, path)
    log(f"dispatch_table: {path}: {table_summary(table)}")
    return 0


# ============================================================================ main

STAGES: dict[str, Callable[[Ctx], int]] = {
    "deps": stage_deps,
    "env": stage_env,
    "parity": stage_parity,
    "calls": stage_calls,
    "calls_compile": lambda ctx: stage_calls(ctx, compiled=True),
    "step": lambda ctx: stage_step(ctx, ctx.plan.step_modes),
    "step_compile": lambda ctx: stage_step(ctx, ctx.plan.compile_step_modes,
                                           baseline=ctx.plan.kernel_modes[0]),
    "profile": stage_profile,
    "latent": stage_latent,
    "trainer": stage_trainer,
    "sample": stage_sample,
    "gpu_tests": stage_gpu_tests,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=[*STAGES, "report", "dispatch_table"])
    ap.add_argument("--out", type=Path, required=True, action="append",
                    help="the results folder (dispatch_table: one or more, later ones win)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/ddhpc_gpu_work"))
    ap.add_argument("--summary", type=Path, help="report: the summary file to append to")
    ap.add_argument("--rehearsal", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--table", type=Path,
                    help="dispatch_table: the JSON to write (default: dispatch_table.json in the "
                         "last --out)")
    a = ap.parse_args(argv)
    if a.stage == "dispatch_table":
        return write_dispatch_table(a.out, a.table or a.out[-1] / "dispatch_table.json")
    if len(a.out) > 1:
        ap.error(f"{a.stage} takes one --out")
    a.out = a.out[0]
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage == "report":
        return stage_report(a.out, a.summary or a.out / "summary.txt")
    if os.environ.get("DD_STALL_STAGE") == a.stage:
        # Test hook: a stage that never finishes, to check the time limits of gpu_run.sh.
        log(f"{a.stage}: DD_STALL_STAGE set, sleeping")
        time.sleep(10**6)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.stage == "deps":  # needs no torch (~2 s to import)
        return stage_deps(Ctx(a.out, a.work, Plan.make(a.rehearsal), None))
    import torch

    if a.rehearsal:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cuda" if torch.cuda.is_available() and not a.rehearsal else "cpu")
    if a.stage not in ("deps", "env"):
        # The trainer's default (trainer.matmul_precision: high): TF32 for fp32 matmuls.
        torch.set_float32_matmul_precision("high" if a.stage != "parity" else "highest")
    ctx = Ctx(a.out, a.work, Plan.make(a.rehearsal), device)
    try:
        return STAGES[a.stage](ctx)
    except Exception:  # noqa: BLE001 - the traceback goes to the log, the status to the summary
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
