"""GPU timing driver for the Triton kernels (and a whole U-Net training step).

    python benchmarks/run.py                      # ambient shapes, batch 48, bf16 -> results/<gpu>.{csv,md}
    python benchmarks/run.py --ops layer_norm --dtype fp16
    python benchmarks/run.py --smoke --out /tmp/b # tiny shapes; runs on CPU under TRITON_INTERPRET=1

For every op and U-Net level it times forward, forward+backward (backward = the difference) of
eager PyTorch, torch.compile of the eager reference, and the Triton op, records peak memory above
the inputs, and the achieved bandwidth on the op's unavoidable traffic (see each bench_*.py) as a
fraction of the GPU's peak. `--step` adds the ambient U-Net training step (bf16 autocast, AdamW):
eager, compile, Triton kernels, and Triton kernels + compile. Without a GPU (and without --smoke)
it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from depthdif_hpc.kernels import DTYPES

HERE = Path(__file__).resolve().parent
OPS = ("convnext_front", "convnext_epilogue", "layer_norm", "linear_attention")
# Peak HBM bandwidth by device name, used when the device properties do not give the clocks.
PEAK_BW = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12,
           "A100": 1.555e12}
FIELDS = ["op", "shape", "dtype", "impl", "fwd_ms", "bwd_ms", "fwdbwd_ms", "peak_mem_mb",
          "fwdbwd_gbps", "frac_peak_bw", "speedup_vs_eager", "speedup_vs_compile", "note"]


def load_bench(op: str):
    path = HERE / f"bench_{op}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{op}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def peak_bandwidth(device: torch.device) -> tuple[float, str]:
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8, "clock x bus width (DDR)"
    for key, bw in PEAK_BW.items():
        if key in props.name:
            return bw, f"datasheet ({key})"
    return float("nan"), "unknown"


class Timer:
    """Median of per-iteration times: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        self.cuda = device.type == "cuda"
        self.warmup, self.reps = warmup, reps

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def time_impl(fn, inputs, extra, timer: Timer, device: torch.device) -> dict[str, float]:
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    params = [t for t in leaves if t is not None]
    dy = torch.randn_like(inputs[0])

    def fwd():
        return fn(*leaves, *extra)

    def fwdbwd():
        for p in params:
            p.grad = None
        fn(*leaves, *extra).backward(dy)

    res = {"fwd_ms": timer(fwd), "fwdbwd_ms": timer(fwdbwd)}
    res["bwd_ms"] = res["fwdbwd_ms"] - res["fwd_ms"]
    if device.type == "cuda":
        for p in params:
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwdbwd()
        torch.cuda.synchronize()
        res["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        res["peak_mem_mb"] = float("nan")
    return res


def run_ops(args, device, timer, peak_bw) -> list[dict]:
    rows = []
    dtype = DTYPES[args.dtype]
    for op in args.ops:
        bench = load_bench(op)
        levels = ((8, 4),) if args.smoke else bench.AMBIENT_LEVELS
        for case in bench.cases(args.batch, dtype, device=str(device), levels=levels):
            fns = dict(case["fns"])
            if args.compile:
                fns["compile"] = torch.compile(case["fns"]["eager"], dynamic=False)
            extra = case.get("extra", ())
            got = {}
            for impl, fn in fns.items():
                try:
                    got[impl] = time_impl(fn, case["inputs"], extra, timer, device)
                except torch.OutOfMemoryError:
                    got[impl] = None
                    torch.cuda.empty_cache()
            ideal = case["bytes_fwd"] + case["bytes_bwd"]
            for impl, r in got.items():
                row = dict(op=op, shape=case["shape"], dtype=args.dtype, impl=impl)
                if r is None:
                    rows.append(row | {"note": "out of memory"})
                    continue
                row |= {k: r[k] for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms", "peak_mem_mb")}
                row["fwdbwd_gbps"] = ideal / (r["fwdbwd_ms"] * 1e-3) / 1e9
                row["frac_peak_bw"] = row["fwdbwd_gbps"] * 1e9 / peak_bw
                for ref in ("eager", "compile"):
                    if got.get(ref):
                        row[f"speedup_vs_{ref}"] = got[ref]["fwdbwd_ms"] / r["fwdbwd_ms"]
                row["note"] = f"fwd-only {case['bytes_fwd'] / (r['fwd_ms'] * 1e-3) / peak_bw:.0%} of peak bw"
                rows.append(row)
                print(_fmt(row), flush=True)
    return rows


def run_step(args, device, timer) -> list[dict]:
    """Whole U-Net training step at the ambient preset's widths (forward, MSE, backward, AdamW)."""
    from depthdif_hpc.model.unet import UNet

    B, px, dim = (1, 8, 8) if args.smoke else (args.step_batch, 128, 96)
    dims = (1, 2) if args.smoke else (1, 2, 4, 8)
    rows = []
    modes = [("eager", False, False), ("triton", True, False)]
    if args.compile:
        modes += [("compile", False, True), ("triton+compile", True, True)]
    for name, kernels, compiled in modes:
        torch.manual_seed(0)
        model = UNet(dim=dim, out_dim=50, dim_mults=dims, channels=102, coord_emb_dim=dim).to(device)
        model.set_kernels("triton" if kernels else "eager")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        fwd = torch.compile(model) if compiled else model
        x = torch.randn(B, 102, px, px, device=device)
        t = torch.randint(0, 1000, (B,), device=device)
        c = torch.randn(B, dim, device=device)
        target = torch.randn(B, 50, px, px, device=device)
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype != "fp32")

        def step(opt=opt, fwd=fwd, amp=amp, x=x, t=t, c=c, target=target):
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = torch.nn.functional.mse_loss(fwd(x, t, c).float(), target)
            loss.backward()
            opt.step()

        row = dict(op="unet_train_step", shape=f"B{B} 102x{px}x{px} dim{dim}", dtype=args.dtype,
                   impl=name)
        try:
            row["fwdbwd_ms"] = timer(step)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                step()
                torch.cuda.synchronize()
                row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        except torch.OutOfMemoryError:
            row["note"] = "out of memory"
            torch.cuda.empty_cache()
        rows.append(row)
        print(_fmt(row), flush=True)
        del model, opt, fwd, step
    base = {r["impl"]: r.get("fwdbwd_ms") for r in rows}
    for r in rows:
        for ref in ("eager", "compile"):
            if base.get(ref) and r.get("fwdbwd_ms"):
                r[f"speedup_vs_{ref}"] = base[ref] / r["fwdbwd_ms"]
    return rows


DATA_ARGS = {"x_ptr", "y_ptr", "dy_ptr", "dh0_ptr", "dx_ptr", "s_ptr", "t_ptr", "q_ptr", "k_ptr",
             "v_ptr", "g_ptr", "out_ptr", "dq_ptr", "dk_ptr", "dv_ptr"}


def compile_report(dtype: str, arch: int = 90) -> int:
    """Compile every kernel at the configs the heuristics pick for the ambient shapes, for sm_<arch>,
    without a GPU (Triton + ptxas), and print registers and spill stack per thread (cuobjdump).
    Must run without TRITON_INTERPRET. Returns the number of kernels that spill."""
    import os
    import subprocess
    import tempfile

    import depthdif_hpc.kernels  # noqa: F401
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    cf = sys.modules["depthdif_hpc.kernels.convnext_front"]
    norm = sys.modules["depthdif_hpc.kernels.layer_norm"]
    la = sys.modules["depthdif_hpc.kernels.linear_attention"]
    tl_dt = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[dtype]
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    target = GPUTarget("cuda", arch, 32)
    spilled = 0

    def build(fn, consts, nw, label):
        nonlocal spilled
        sig = {}
        for name in fn.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in DATA_ARGS:
                sig[name] = "*" + tl_dt
            elif name.endswith(("_ptr", "_part")):
                sig[name] = "*fp32"
            elif name in ("eps", "scale"):
                sig[name] = "fp32"
            else:
                sig[name] = "i32"
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target,
                           options={"num_warps": nw})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        usage = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True).stdout
        os.unlink(f.name)
        m = re.search(r"REG:(\d+).*?STACK:(\d+)", usage)
        regs, stack = (int(m.group(1)), int(m.group(2))) if m else (-1, -1)
        spilled += stack > 0
        print(f"{fn.__name__:22s} {label:44s} warps {nw:2d}  regs {regs:3d}  stack {stack}", flush=True)

    for C, px in ((96, 128), (192, 64), (384, 32), (768, 16), (1536, 16)):
        bc, bp, one, nw = cf._front_tiles(C, px * px)
        for ln, film in ((True, True), (False, True), (True, False)):
            flags = dict(HAS_BIAS=True, HAS_TB=True, HAS_FILM=film, HAS_LN=ln, ONE_CHUNK=one,
                         BLOCK_C=bc, BLOCK_P=bp)
            label = f"C{C} {bc}x{bp} ln={ln} film={film}"
            build(cf._fwd_kernel, flags, nw, label)
            build(cf._bwd_main_kernel, flags | dict(STORE_DH0=True), nw, label)
        dbc, dbp, dnw = cf._dw_tiles(C, px * px)
        build(cf._dw_bwd_kernel, dict(BLOCK_C=dbc, BLOCK_P=dbp), dnw, f"C{C} {dbc}x{dbp}")
        lbc, lbp, lone, lnw = norm._tiles(C, px * px, True)
        lflags = dict(ONE_CHUNK=lone, BLOCK_C=lbc, BLOCK_P=lbp)
        build(norm._ln_fwd_kernel, lflags, lnw, f"C{C} {lbc}x{lbp} NHWC")
        build(norm._ln_bwd_kernel, lflags, lnw, f"C{C} {lbc}x{lbp} NHWC")
    prec = "ieee" if dtype == "fp32" else "tf32"
    bd, bn, bnr, _, _ = la._plan(192, 128 * 128, 32, torch.device("cpu"))
    for fn, b in ((la._ctx_partial_kernel, bnr), (la._out_kernel, bn), (la._dctx_partial_kernel, bnr),
                  (la._bwd_kernel, bn)):
        build(fn, dict(BLOCK_D=bd, BLOCK_N=b, PREC=prec), 8, f"d32 BLOCK_N {b} {prec}")
    build(la._ctx_combine_kernel, dict(BLOCK_D=bd), 4, "d32")
    print(f"{spilled} kernel(s) spill registers to local memory")
    return spilled


def _fmt(row: dict) -> str:
    return " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values())


def write(rows: list[dict], out: Path, tag: str, header: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{tag}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    cols = ["op", "shape", "impl", "fwd_ms", "bwd_ms", "fwdbwd_ms", "peak_mem_mb", "frac_peak_bw",
            "speedup_vs_eager", "speedup_vs_compile"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.1%}" if c == "frac_peak_bw" and isinstance(v, float)
                         else f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    (out / f"{tag}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / (tag + '.csv')} and {out / (tag + '.md')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile baselines")
    p.add_argument("--no-step", dest="step", action="store_false", help="skip the U-Net step")
    p.add_argument("--step-batch", type=int, default=48)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, 1 rep, no compile: checks the driver (works on CPU)")
    p.add_argument("--compile-report", action="store_true",
                   help="no timing: compile all kernels for sm_90 (no GPU needed, run without "
                        "TRITON_INTERPRET) and print registers / spills per kernel")
    args = p.parse_args(argv)
    if args.compile_report:
        compile_report(args.dtype)
        return 0

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        print("benchmarks/run.py needs a CUDA GPU (H100/H200) for timings; none found. "
              "Use --smoke to exercise the driver on CPU under TRITON_INTERPRET=1.")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if args.smoke:
        args.batch, args.warmup, args.reps, args.compile = 1, 0, 1, False
        if not cuda:
            args.dtype = "fp32"  # the interpreter mishandles bf16 arithmetic
    if cuda:
        name = torch.cuda.get_device_name(device)
        peak_bw, bw_src = peak_bandwidth(device)
    else:
        name, peak_bw, bw_src = "cpu", float("nan"), "n/a"
    tag = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ("_smoke" if args.smoke else "")
    timer = Timer(device, args.warmup, args.reps)
    rows = run_ops(args, device, timer, peak_bw)
    if args.step:
        rows += run_step(args, device, timer)
    header = (f"# Kernel benchmarks on {name} ({args.dtype}, batch {args.batch}); torch "
              f"{torch.__version__}; peak bandwidth {peak_bw / 1e12:.2f} TB/s ({bw_src}). "
              "Bandwidth fraction: unavoidable bytes of the op / fwd+bwd time / peak.")
    write(rows, args.out, tag, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
