"""Static compile report: every Triton kernel variant the U-Net launches, compiled for sm_90.

    python benchmarks/compile_report.py [--preset ambient|standard] [--batch 48] [--size 128]
        [--modes bf16,fp32] [--sms 132] [--out DIR] [--json FILE] [--jobs N]

No GPU needed: each variant is compiled ahead of time for an H100/H200 (`triton.compile` of an
`ASTSource` for `GPUTarget("cuda", 90, 32)`, Triton's own ptxas) and reported with its registers
per thread, spill stores/loads and shared memory. Exit status 1 if any variant fails to compile
or could not launch (registers x threads above the 64K of an SM, shared memory above 227 KB).
Triton 3.9, ambient preset, NCHW, channels_last and channels_last with the epilogue fronts:
142 variants (14 of them the epilogue's), no spills; worst 155 registers (v1
`_dw_bwd_kernel`, fp32, 4 warps) and 76 KB shared memory (linear-attention
`_bwd_kernel`, fp32); the `ld_global_bytes` column counts each variant's global loads by width
(bytes per thread, from the PTX): the NHWC front's taps are 8- and 16-byte vectors, v1's NCHW
taps 2 (bf16) or 4 (fp32) bytes. Recording took 9-27 s, compiling 4-11 min on 2 busy cores
(one process per core since the epilogue variants were added: `--jobs`).

Which variants: those the training step really launches. The preset's model (kernels=triton)
runs forward and backward at the real batch and patch size on the meta device (no compute, no
memory), with the host code of every `depthdif_hpc::*` custom op executed as it is on a GPU (GPU
block-size heuristics, `--sms` streaming multiprocessors: 132 on H100 SXM and H200) and every
`JITFunction` launch recorded instead of run. A launch is specialised by Triton's own binder for
the CUDA backend, exactly as the JIT does on the GPU: pointers 16-byte aligned (a view's storage
offset decides; the caching allocator aligns every allocation to 512 bytes) and integers
divisible by 16 get `tt.divisibility`, integers equal to 1 become constants, constexprs are the
values the host code chose for these shapes. Launches with the same specialisation and options
are one variant. Shapes matter (block sizes, splits and the `== 1` / `% 16` specialisations
follow C, H*W and batch x heads), hence the real 48 x 128 x 128 ambient step by default.

Modes: `bf16` is the trainer's mixed precision (CUDA autocast: bf16 activations out of every
convolution and linear, fp32 parameters and fp32 data into the first block); `fp32` is full
precision. Both use `trainer.matmul_precision` of the training config (`high`: TF32 `tl.dot`).
Autocast does not apply to meta tensors, so it is emulated for the ops that autocast lowers
(`_Bf16Autocast`); benchmarks/test_compile_report.py checks that the emulation records the same
launches as torch's real autocast on CPU tensors.

Memory formats: the step is recorded with the model and its input in contiguous NCHW and again
in channels_last (the trainer's `channels_last` switch; mode names get `+cl`), where the fronts
launch the NHWC kernels of kernels/convnext_front_nhwc.py; then once more in bf16 channels_last
with every front routed to the epilogue variant (kernels/convnext_epilogue.py; mode
`bf16+cl+epilogue`), which a dispatch table may choose for any call. Meta convolutions do not
propagate channels_last, so that too is emulated (`_MetaChannelsLast`) and checked against CPU
tensors.

With TRITON_INTERPRET=1 set (as `make test` does) the `@triton.jit` decorators build interpreter
objects that cannot be compiled, so the program re-runs itself without it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ARCH = 90
WARP_SIZE = 32
H100_SMS = 132  # H100 SXM and H200; H100 PCIe has 114
MAX_SMEM_SM90 = 227 * 1024  # opt-in shared memory per block on sm_90
REGS_PER_SM = 65536  # 32-bit registers per SM (and per block) on sm_90
PTR_BASE = 1 << 20  # a 512-byte aligned address standing in for a fresh CUDA allocation


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------- specialisation


class _Ptr:
    """What Triton's binder reads from a tensor argument: its dtype and address."""

    def __init__(self, t: torch.Tensor) -> None:
        self.dtype = t.dtype
        self.offset = t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return PTR_BASE + self.offset


@dataclass
class Variant:
    """One distinct (kernel, specialisation, launch options) of the recorded step."""

    kernel: Any  # triton JITFunction
    op: str
    phase: str
    spec: list
    bound: dict
    kwargs: dict
    key: tuple
    modes: list[str] = field(default_factory=list)
    launches: int = 0
    site: str = ""


_BACKENDS: dict[str, Any] = {}
_BINDERS: dict[int, Any] = {}


def _backend() -> Any:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    if "cuda" not in _BACKENDS:
        _BACKENDS["cuda"] = make_backend(GPUTarget("cuda", ARCH, WARP_SIZE))
    return _BACKENDS["cuda"]


def specialize(kernel: Any, args: tuple, kwargs: dict) -> tuple[dict, list, dict]:
    """(bound args, specialisation, options) of a launch, from Triton's own binder for sm_90."""
    from triton.runtime.jit import create_function_from_signature

    binder = _BINDERS.get(id(kernel))
    if binder is None:
        binder = create_function_from_signature(kernel.signature, kernel.params, _backend())
        _BINDERS[id(kernel)] = binder
    args = tuple(_Ptr(a) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = {k: _Ptr(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return binder(*args, **kwargs)


def pack(kernel: Any, variant_kwargs: dict, bound: dict, spec: list) -> tuple[Any, dict, dict, dict]:
    """(options, signature, constexprs, attrs) as the JIT hands them to `ASTSource`."""
    return kernel._pack_args(_backend(), dict(variant_kwargs), bound, spec, None)


# ----------------------------------------------------------------------------- recording


class _Bf16Autocast(torch.overrides.TorchFunctionMode):
    """CUDA autocast (bf16) for tensors it does not reach (meta): the ops on autocast's
    lower-precision list get floating inputs other than fp64 cast to bf16, everything else runs
    in the dtypes it is given, as under autocast."""

    def __init__(self) -> None:
        super().__init__()
        F = torch.nn.functional
        self.ops = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
                    F.conv_transpose3d, F.linear, torch.matmul, torch.mm, torch.bmm, torch.addmm,
                    torch.baddbmm, torch.Tensor.matmul, torch.Tensor.__matmul__}

    @staticmethod
    def _cast(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
            return x.to(torch.bfloat16)
        return x

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.ops:
            args = tuple(self._cast(a) for a in args)
            kwargs = {k: self._cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


class _MetaChannelsLast(torch.overrides.TorchFunctionMode):
    """Memory-format propagation on the meta device as CUDA and CPU do it for this model: torch's
    meta kernels return contiguous NCHW from convolutions and from some broadcasts and
    concatenations whose inputs are channels_last. A fresh (non-view) 4-D result with C > 1 of
    an op that had a channels_last 4-D input is made channels_last; checked against real CPU
    tensors by benchmarks/test_compile_report.py."""

    @staticmethod
    def _cl(t: Any) -> bool:
        return (isinstance(t, torch.Tensor) and t.ndim == 4 and not t.is_contiguous()
                and t.is_contiguous(memory_format=torch.channels_last))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (isinstance(out, torch.Tensor) and out.device.type == "meta" and out.ndim == 4
                and out.shape[1] > 1 and out._base is None and not self._cl(out)):
            ins = [*args, *(args[0] if args and isinstance(args[0], list | tuple) else ())]
            if any(self._cl(t) for t in ins):
                out = out.contiguous(memory_format=torch.channels_last)
        return out


class _Recorder:
    """Runs custom-op host code on any device and records JITFunction launches instead of running
    them (the outputs stay uninitialised: only shapes, dtypes and launches matter here)."""

    def __init__(self, sms: int) -> None:
        self.sms = sms
        self.variants: dict[tuple, Variant] = {}
        self.mode = ""
        self.op_stack: list[tuple[str, str]] = []
        self.site = ""
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> _Recorder:
        import depthdif_hpc.kernels  # noqa: F401 - registers the custom ops
        from triton.runtime.jit import JITFunction

        recorder = self

        def run(kernel, *args, grid, warmup, **kwargs):
            recorder._record(kernel, args, kwargs)
            return None

        self._patch(JITFunction, "run", run)
        dispatch = sys.modules.get("depthdif_hpc.kernels.dispatch")
        if dispatch is not None:
            # model.kernels=triton self-checks each kernel variant on first use by running it;
            # here nothing runs, so every variant counts as checked.
            self._patch(dispatch.KernelDispatcher, "verdict", lambda *a, **k: None)
        for name, mod in list(sys.modules.items()):
            if name.startswith("depthdif_hpc.kernels") and hasattr(mod, "num_sms"):
                self._patch(mod, "num_sms", lambda device: self.sms)
        return self

    def __exit__(self, *exc: object) -> None:
        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)
        self._saved.clear()

    def _patch(self, obj: Any, name: str, value: Any) -> None:
        self._saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    def _record(self, kernel: Any, args: tuple, kwargs: dict) -> None:
        op, phase = self.op_stack[-1] if self.op_stack else ("?", "?")
        bound, spec, options = specialize(kernel, args, kwargs)
        key = (kernel.fn.__module__, kernel.fn.__qualname__, repr(spec),
               repr(sorted(options.items())))
        v = self.variants.get(key)
        if v is None:  # options: the launch keywords that are not kernel arguments (num_warps)
            v = self.variants[key] = Variant(kernel, op, phase, spec, bound, dict(options), key)
        if self.mode not in v.modes:
            v.modes.append(self.mode)
        v.launches += 1
        if not v.site:
            v.site = self.site


class _RunOpBodies(torch.utils._python_dispatch.TorchDispatchMode):
    """Executes the Python body of every depthdif_hpc custom op (on meta tensors too, where the
    dispatcher would otherwise pick the fake kernel) and tells the recorder which op runs."""

    def __init__(self, recorder: _Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "depthdif_hpc":
            return func(*args, **kwargs)
        from torch._library.custom_ops import _maybe_get_opdef

        opdef = _maybe_get_opdef(func)
        if opdef is None:
            raise RuntimeError(f"{func} is not a torch.library.custom_op; cannot run its host code")
        name = func.overloadpacket.__name__
        op, _, phase = name.rpartition("_")
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        self.recorder.site = f"{tuple(first.shape)} {str(first.dtype).removeprefix('torch.')}" \
            if first is not None else ""
        self.recorder.op_stack.append((op, phase))
        try:
            return opdef._init_fn(*args, **kwargs)
        finally:
            self.recorder.op_stack.pop()


def build_preset_model(preset: str, overrides: list[str] | None = None,
                       device: str = "meta") -> tuple[torch.nn.Module, Any]:
    """The preset's DepthDif (three px_space configs) with the Triton kernels on, and its config."""
    from depthdif_hpc.config import load_config
    from depthdif_hpc.model.build import build_model

    model_yaml = "model_config_ambient.yaml" if preset == "ambient" else "model_config.yaml"
    cfg = load_config(*(ROOT / "configs/px_space" / f for f in
                        (model_yaml, "training_config.yaml", "data_config.yaml")),
                      overrides=["model.kernels=triton", *(overrides or [])])
    with torch.device(device):
        model = build_model(cfg)
    return model, cfg


def _training_step(model: torch.nn.Module, batch: int, size: int, device: str,
                   autocast: str, channels_last: bool = False) -> None:
    """U-Net forward + backward of one training batch.

    With `channels_last` the model and its input are in torch.channels_last, as the trainer's
    channels_last switch runs them (the fronts then launch the NHWC kernels).
    """
    unet = model.model
    if autocast == "emulate":
        amp = _Bf16Autocast()
    elif autocast == "torch":
        amp = torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    else:
        amp = contextlib.nullcontext()
    x = torch.zeros(batch, unet.channels, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.zeros(batch, dtype=torch.long, device=device)
    layout = _MetaChannelsLast() if channels_last else contextlib.nullcontext()
    with layout, amp:
        c = None
        if model.coord_mlp is not None:
            net = model.coord_mlp.net
            c = net(torch.zeros(batch, net[0].in_features, device=device))
        out = unet(x, t, c)
    out.float().sum().backward()


# The trainer's memory formats: contiguous NCHW, and channels_last (mode names get "+cl").
# "cl+epilogue": channels_last with every front routed to the epilogue variant, as a dispatch
# table (kernels/dispatch_table.py) that chose it everywhere would run them.
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last,
           "cl+epilogue": torch.channels_last}


@contextlib.contextmanager
def _fronts_run(fmt: str) -> Any:
    """The front the dispatcher picks for channels_last calls: the epilogue variant for
    "cl+epilogue", else what the (absent) dispatch table says, the fused v2 front."""
    from depthdif_hpc.kernels import dispatch
    from depthdif_hpc.kernels._testing import epilogue_fronts

    saved = dispatch.choose_impl
    if fmt == "cl+epilogue":
        dispatch.choose_impl = epilogue_fronts
    try:
        yield
    finally:
        dispatch.choose_impl = saved


def record_variants(preset: str = "ambient", batch: int = 48, size: int = 128,
                    modes: tuple[str, ...] = ("bf16", "fp32"), sms: int = H100_SMS,
                    device: str = "meta", autocast: str = "emulate",
                    overrides: list[str] | None = None,
                    formats: tuple[str, ...] = ("nchw", "cl"),
                    epilogue_modes: tuple[str, ...] = ("bf16",)) -> list[Variant]:
    """Every distinct kernel launch of one training step of the preset (see the docstring),
    and with `epilogue_modes` the step again in channels_last with the fronts' epilogue variant.

    device "cpu" with autocast "torch" runs the same step for real on CPU tensors (the kernels
    are still only recorded), which is how the autocast emulation is checked.
    """
    if _interpreting():
        raise RuntimeError("record_variants needs TRITON_INTERPRET unset (real JITFunctions)")
    model, cfg = build_preset_model(preset, overrides, device)
    precision = torch.get_float32_matmul_precision()
    rec = _Recorder(sms)
    try:
        torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
        runs = [(fmt, mode) for fmt in formats for mode in modes]
        runs += [("cl+epilogue", mode) for mode in epilogue_modes]
        with rec:
            for fmt, mode in runs:
                if fmt not in FORMATS:
                    raise ValueError(f"unknown memory format {fmt!r}: one of {sorted(FORMATS)}")
                if mode not in ("bf16", "fp32"):
                    raise ValueError(f"unknown mode {mode!r}: bf16 or fp32")
                model.to(memory_format=FORMATS[fmt])
                rec.mode = mode if fmt == "nchw" else f"{mode}+{fmt}"
                with _RunOpBodies(rec), _fronts_run(fmt):
                    _training_step(model, batch, size, device,
                                   autocast if mode == "bf16" else "none", fmt != "nchw")
                model.zero_grad(set_to_none=True)
    finally:
        torch.set_float32_matmul_precision(precision)
    return sorted(rec.variants.values(),
                  key=lambda v: (v.op, v.phase, v.kernel.fn.__qualname__, v.modes, v.key))


def jit_functions() -> dict[str, Any]:
    """Every JITFunction the kernels package defines ("module.name" -> function)."""
    import depthdif_hpc.kernels as pkg
    from triton.runtime.jit import JITFunction

    out = {}
    for info in sorted(Path(pkg.__file__).parent.glob("*.py")):
        mod = importlib.import_module(f"depthdif_hpc.kernels.{info.stem}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                out[f"{mod.__name__}.{name}"] = obj
    return out


# ----------------------------------------------------------------------------- compiling

_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_LD_GLOBAL = re.compile(r"\bld\.global((?:\.[\w:]+)+)")


def load_widths(ptx: str) -> dict[int, int]:
    """{bytes per thread: count} of the global loads (`ld.global[.v2|.v4].<type><bits>`) in PTX."""
    out: dict[int, int] = {}
    for m in _LD_GLOBAL.finditer(ptx):
        parts = m[1].split(".")[1:]
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bufs]\d+", p)), 0)
        out[vec * bits // 8] = out.get(vec * bits // 8, 0) + 1
    return dict(sorted(out.items()))


_RES_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resources_from_cubin(cubin: bytes) -> dict[str, int]:
    """Fallback when no ptxas log was printed (kernel found in Triton's cache)."""
    import triton

    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = _RES_USAGE.search(text)
    if m is None:
        raise RuntimeError(f"cannot read registers from cuobjdump -res-usage:\n{text}")
    # No spill counts there: a stack frame is where spills go, so report it as both.
    return {"regs": int(m[1]), "stack_bytes": int(m[2]), "spill_store_bytes": int(m[2]),
            "spill_load_bytes": int(m[2])}


def compile_variant(v: Variant) -> dict[str, Any]:
    """Compile one variant for sm_90; registers, spills (ptxas -v) and shared memory."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options, signature, constexprs, attrs = pack(v.kernel, v.kwargs, v.bound, v.spec)
    log = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if hasattr(knobs, "nvidia") and hasattr(knobs.nvidia, "dump_ptxas_log"):
            stack.enter_context(knobs.nvidia.scope())
            knobs.nvidia.dump_ptxas_log = True
        stack.enter_context(contextlib.redirect_stdout(log))
        kernel = triton.compile(ASTSource(v.kernel, signature, constexprs, attrs),
                                target=GPUTarget("cuda", ARCH, WARP_SIZE), options=options.__dict__)
    seconds = time.perf_counter() - t0
    text = log.getvalue()
    used, spill = _PTXAS_USED.search(text), _PTXAS_SPILL.search(text)
    if used and spill:
        res = {"regs": int(used[1]), "stack_bytes": int(spill[1]),
               "spill_store_bytes": int(spill[2]), "spill_load_bytes": int(spill[3])}
    else:
        res = _resources_from_cubin(kernel.asm["cubin"])
    md = kernel.metadata
    widths = load_widths(kernel.asm["ptx"])
    res["ld_global_bytes"] = " ".join(f"{w}B:{n}" for w, n in widths.items())
    res["ld_global_min_bytes"] = min(widths, default=0)
    out = {**res, "smem_bytes": int(md.shared), "num_warps": int(md.num_warps),
           "num_stages": int(md.num_stages), "compile_s": round(seconds, 2)}
    # What the driver would refuse at launch ("too many resources requested" / out of shared
    # memory): a compiled kernel that cannot launch fails like one that does not compile.
    threads = out["num_warps"] * WARP_SIZE
    if out["regs"] * threads > REGS_PER_SM:
        raise RuntimeError(f"{out['regs']} registers x {threads} threads exceed the "
                           f"{REGS_PER_SM} registers of an SM")
    if out["smem_bytes"] > MAX_SMEM_SM90:
        raise RuntimeError(f"{out['smem_bytes']} bytes of shared memory exceed {MAX_SMEM_SM90}")
    return out


def describe(v: Variant) -> dict[str, Any]:
    """The variant in words: pointer dtypes, integer specialisations, constexprs."""
    names = [p.name for p in v.kernel.params]
    ptrs, ints, consts = [], [], []
    for name, (kind, attr) in zip(names, v.spec, strict=True):
        if kind == "constexpr":
            consts.append(f"{name}={attr}")
        elif kind.startswith("*"):
            ptrs.append(f"{name}:{kind[1:]}" + ("" if attr == "D" else "(unaligned)"))
        elif kind[0] in "iu":
            ints.append(f"{name}%16" if attr == "D" else name)
    return {"pointers": " ".join(ptrs), "ints": " ".join(ints), "constexprs": " ".join(consts)}


# The variants of the running report, for the compile workers forked from it (a Variant holds
# JITFunctions, which do not pickle; a forked child has them already).
_TO_COMPILE: list[Variant] = []


def _compile_or_error(i: int) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return compile_variant(_TO_COMPILE[i]), None
    except Exception as e:  # noqa: BLE001 - every failure is reported, then the exit is 1
        return None, f"{type(e).__name__}: {e}"


def report(variants: list[Variant], jobs: int = 1) -> tuple[list[dict[str, Any]], list[str]]:
    """Compile every variant (in `jobs` forked processes: each compile is one single-threaded
    LLVM + ptxas run, 1-5 s); rows for the table and the errors (kernel + message)."""
    _TO_COMPILE[:] = variants
    try:
        if jobs > 1 and len(variants) > 1:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                results = pool.map(_compile_or_error, range(len(variants)), chunksize=1)
        else:
            results = [_compile_or_error(i) for i in range(len(variants))]
    finally:
        _TO_COMPILE.clear()
    rows, errors = [], []
    for v, (compiled, error) in zip(variants, results, strict=True):
        row: dict[str, Any] = {"op": v.op, "phase": v.phase, "kernel": v.kernel.fn.__qualname__,
                               "module": v.kernel.fn.__module__, "modes": ",".join(v.modes),
                               "launches": v.launches, "site": v.site,
                               "launch_num_warps": v.kwargs.get("num_warps"), **describe(v)}
        if error is None:
            row.update(compiled)
            row["ok"] = True
        else:
            row["ok"] = False
            row["error"] = error
            errors.append(f"{row['kernel']} [{row['constexprs']}]: {row['error']}")
        rows.append(row)
    return rows, errors


# ----------------------------------------------------------------------------- output

COLUMNS = ["op", "phase", "kernel", "modes", "launches", "num_warps", "num_stages", "regs",
           "spill_store_bytes", "spill_load_bytes", "smem_bytes", "compile_s", "ld_global_bytes",
           "site",
           "pointers", "ints", "constexprs"]


def _markdown(rows: list[dict[str, Any]], header: str) -> str:
    cols = [c for c in COLUMNS if c not in ("pointers", "ints")]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["ok"]]
    worst = lambda k: max(ok, key=lambda r: r[k]) if ok else None  # noqa: E731
    out: dict[str, Any] = {"variants": len(rows), "compiled": len(ok),
                           "compile_s": round(sum(r["compile_s"] for r in ok), 1)}
    for k in ("regs", "spill_store_bytes", "smem_bytes"):
        w = worst(k)
        if w is not None:
            out[f"max_{k}"] = {"value": w[k], "kernel": w["kernel"], "constexprs": w["constexprs"]}
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["ambient", "standard"], default="ambient")
    ap.add_argument("--batch", type=int, default=48, help="per-GPU batch (training_config: 48)")
    ap.add_argument("--size", type=int, default=128, help="patch side in pixels")
    ap.add_argument("--modes", default="bf16,fp32")
    ap.add_argument("--sms", type=int, default=H100_SMS, help="SMs of the target GPU")
    ap.add_argument("--out", type=Path, help="write compile_report.csv and compile_report.md here")
    ap.add_argument("--json", type=Path, help="write the rows and the summary as JSON")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                    help="compile processes (each compile is single-threaded)")
    args = ap.parse_args(argv)

    if _interpreting():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env).returncode
    import triton

    with tempfile.TemporaryDirectory() as cache:
        # A fresh cache: every variant is compiled now (a compile error cannot hide behind an
        # earlier success), and ptxas prints its register and spill report for each.
        os.environ["TRITON_CACHE_DIR"] = cache
        t0 = time.perf_counter()
        variants = record_variants(args.preset, args.batch, args.size,
                                   tuple(m for m in args.modes.split(",") if m), args.sms)
        t_record = time.perf_counter() - t0
        rows, errors = report(variants, args.jobs)
    launched = {f"{r['module']}.{r['kernel']}" for r in rows}
    summary = {"preset": args.preset, "batch": args.batch, "size": args.size, "modes": args.modes,
               "sms": args.sms, "target": f"cuda sm_{ARCH}", "triton": triton.__version__,
               "torch": torch.__version__, "record_s": round(t_record, 1),
               "jit_functions": sorted(jit_functions()), "launched_kernels": sorted(launched),
               **_summary(rows)}
    header = (f"Triton {triton.__version__}, sm_{ARCH}: {summary['compiled']}/{len(rows)} variants "
              f"of the {args.preset} training step (batch {args.batch}, {args.size}x{args.size}, "
              f"modes {args.modes}, {args.sms} SMs)")
    width = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in COLUMNS[:13]}
    print(header)
    print("  ".join(c.rjust(width[c]) for c in COLUMNS[:13]))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(width[c]) for c in COLUMNS[:13]))
    for k in ("regs", "spill_store_bytes", "smem_bytes"):
        if f"max_{k}" in summary:
            w = summary[f"max_{k}"]
            print(f"max {k}: {w['value']} ({w['kernel']} {w['constexprs']})")
    print(f"recorded in {t_record:.1f} s, compiled in {summary['compile_s']} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "compile_report.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[*COLUMNS, "module", "launch_num_warps", "stack_bytes",
                                              "ld_global_min_bytes",
                                              "ok", "error"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        (args.out / "compile_report.md").write_text(_markdown(rows, header))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    for e in errors:
        print(f"COMPILE ERROR {e}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
