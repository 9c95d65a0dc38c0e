"""Every Triton kernel variant of the ambient training step (NCHW and channels_last) compiles for
sm_90 (no GPU needed), spills nothing, and the NHWC front's taps are vector loads.

The compile runs in a child process without TRITON_INTERPRET: under the interpreter (which
`make test` switches on without a GPU) `@triton.jit` builds objects that cannot be compiled.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPS = ("convnext_front", "layer_norm", "linear_attention")
# precision, "+cl" for channels_last, "+epilogue" for the fronts' epilogue variant (bf16 only)
MODES = ("bf16", "fp32", "bf16+cl", "fp32+cl", "bf16+cl+epilogue")
MAX_SMEM_SM90 = 227 * 1024


def _run_jit(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _run_snippet(code: str, timeout: int = 300) -> dict:
    proc = _run_jit(["-c", "import sys; sys.path.insert(0, 'benchmarks')\n" + code], timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile_report")
    proc = _run_jit(["benchmarks/compile_report.py", "--out", str(out), "--json",
                     str(out / "report.json")], timeout=900)
    # Exit status 1 (and COMPILE ERROR lines) if any variant failed to compile.
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    data = json.loads((out / "report.json").read_text())
    data["out"] = out
    data["stdout"] = proc.stdout
    return data


@pytest.mark.slow
def test_every_variant_compiles_with_sane_resources(report):
    rows = report["rows"]
    assert rows and all(r["ok"] for r in rows)
    for r in rows:
        assert 0 < r["regs"] <= 255, r
        assert r["spill_store_bytes"] >= 0 and r["spill_load_bytes"] >= 0, r
        assert 0 <= r["smem_bytes"] <= MAX_SMEM_SM90, r
        assert r["num_warps"] == r["launch_num_warps"], r  # compiled with the launch's options
        assert r["num_stages"] >= 1 and r["launches"] >= 1, r
    # one row per distinct specialisation: no variant is compiled twice
    keys = [(r["module"], r["kernel"], r["pointers"], r["ints"], r["constexprs"], r["num_warps"])
            for r in rows]
    assert len(keys) == len(set(keys))
    s = report["summary"]
    assert (s["preset"], s["batch"], s["size"], s["target"]) == ("ambient", 48, 128, "cuda sm_90")
    assert s["compiled"] == s["variants"] == len(rows)
    assert f"{len(rows)}/{len(rows)} variants" in report["stdout"]
    with open(report["out"] / "compile_report.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (report["out"] / "compile_report.md").read_text().count("\n| ") == len(rows) + 1


@pytest.mark.slow
def test_variants_cover_every_op_phase_mode_and_kernel(report):
    rows = report["rows"]
    for mode in MODES:
        got = {(r["op"], r["phase"]) for r in rows if mode in r["modes"].split(",")}
        # channels_last steps run the front's NHWC op (custom op convnext_front_nhwc_*) instead,
        # or its epilogue variant (convnext_epilogue_*: the kernel after torch's conv)
        front = {"bf16+cl": "convnext_front_nhwc", "fp32+cl": "convnext_front_nhwc",
                 "bf16+cl+epilogue": "convnext_epilogue"}.get(mode, "convnext_front")
        ops = [front if op == "convnext_front" else op for op in OPS]
        assert got == {(op, phase) for op in ops for phase in ("fwd", "bwd")}, (mode, got)
    # autocast reached the kernels: bf16 activations next to fp32 parameters; fp32 has no bf16
    modes = [set(r["modes"].split(",")) for r in rows]
    bf16 = [r for r, m in zip(rows, modes, strict=True) if not m & {"fp32", "fp32+cl"}]
    assert any(":bf16" in r["pointers"] and ":fp32" in r["pointers"] for r in bf16)
    assert not any(":bf16" in r["pointers"] for r, m in zip(rows, modes, strict=True)
                   if not m & {"bf16", "bf16+cl", "bf16+cl+epilogue"})
    # The memory format picks the front: NCHW steps launch v1, channels_last steps the NHWC v2.
    for r, m in zip(rows, modes, strict=True):
        if r["op"].startswith("convnext_front"):
            nhwc = r["module"].endswith("convnext_front_nhwc")
            assert all(x.endswith("+cl") == nhwc for x in m), (r["kernel"], r["module"], m)
    # every @triton.jit function is launched in the step, or is a device helper one calls
    jit = set(report["summary"]["jit_functions"])
    launched = set(report["summary"]["launched_kernels"])
    assert launched <= jit and len(launched) >= 2 * len(OPS)
    for name in jit - launched:
        module, _, fn = name.rpartition(".")
        src = (ROOT / "kernels" / f"{module.rpartition('.')[2]}.py").read_text()
        assert len(re.findall(rf"\b{fn}\(", src)) > 1, f"{name} is neither launched nor called"


@pytest.mark.slow
def test_no_variant_spills(report):
    """Registers suffice everywhere: no spill stores or loads in any launched variant."""
    spilled = [(r["kernel"], r["module"], r["modes"], r["constexprs"], r["spill_store_bytes"],
                r["spill_load_bytes"]) for r in report["rows"]
               if r["spill_store_bytes"] or r["spill_load_bytes"]]
    assert not spilled, spilled


def _load_counts(text: str) -> dict[int, int]:
    """"8B:10 16B:40" -> {8: 10, 16: 40}."""
    return {int(w.removesuffix("B")): int(n) for w, n in (p.split(":") for p in text.split())}


@pytest.mark.slow
def test_nhwc_front_taps_are_vector_loads(report):
    """The channels_last front reads each 7x7 tap as channel vectors of at least 8 bytes.

    The seven column taps of a kernel row are unrolled, so each channel part of the forward and
    main backward (two parts unless C is a power of two), and the dx and dw kernels, have at
    least 7 global loads of >= 8 bytes (ld.global.v2/.v4 in the PTX). With C % 16 == 0 (every
    ambient width) the dx and dw kernels have no narrower load at all; in the forward and main
    backward the per-channel vectors of a 128-channel part (weights, time bias, FiLM: one
    channel per thread of 128) may be narrower, and so may the first block's bf16 vectors
    (C = 102, C % 16 != 0).
    """
    rows = [r for r in report["rows"] if r["module"].endswith("convnext_front_nhwc")]
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_fwd_kernel", "_bwd_main_kernel", "_dx_kernel", "_dw_kernel"}, kernels
    for r in rows:
        counts = _load_counts(r["ld_global_bytes"])
        parts = 1 if "PART_B=0" in r["constexprs"] or r["kernel"] in ("_dx_kernel", "_dw_kernel") \
            else 2
        wide = sum(n for w, n in counts.items() if w >= 8)
        assert wide >= 7 * parts, (r["kernel"], r["constexprs"], counts)
        if "C_DIV=16" in r["constexprs"] and r["kernel"] in ("_dx_kernel", "_dw_kernel"):
            assert r["ld_global_min_bytes"] >= 8, (r["kernel"], r["constexprs"], counts)
    # The NCHW v1 front, for contrast, has scalar 2-byte bf16 taps: the proxy can fail.
    v1 = [r for r in report["rows"] if r["module"].endswith(".convnext_front")
          and r["kernel"] == "_fwd_kernel" and "x_ptr:bf16" in r["pointers"]]
    assert v1 and all(_load_counts(r["ld_global_bytes"]).get(2, 0) >= 7 for r in v1)


def test_load_widths_parse_ptx():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from compile_report import load_widths

    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p2 ld.global.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
    ld.global.L1::evict_last.b16 { %rs1 }, [ %rd3 + 0 ];
    @%p3 ld.global.b32 { %r7 }, [ %rd4 + 0 ];
    ld.global.v4.b32 { %r8, %r9, %r10, %r11 }, [ %rd5 + 0 ];
    st.global.v4.b32 [ %rd6 + 0 ], { %r1, %r2, %r3, %r4 };
    """
    assert load_widths(ptx) == {2: 1, 4: 1, 8: 1, 16: 2}


def test_launches_are_specialised_like_the_jit():
    """Alignment from the storage offset, %16 integers, integers equal to 1 as constants."""
    got = _run_snippet("""
import importlib, json, torch
from compile_report import specialize
k = importlib.import_module("depthdif_hpc.kernels.layer_norm")._ln_fwd_kernel
x = torch.zeros(64)
blocks = dict(ONE_CHUNK=True, BLOCK_C=16, BLOCK_P=4, num_warps=4)
spec = lambda *a: [list(s) for s in specialize(k, a, blocks)[1]]
print(json.dumps({"a": spec(x, x[1:], x[4:], x.bfloat16(), x, x, 1, 7, 5, 5, 5, 1e-5),
                  "b": spec(x, x, x, x, x, x, 32, 2**31, 5, 5, 5, 1e-5)}))
""")
    assert got["a"][:8] == [["*fp32", "D"], ["*fp32", ""], ["*fp32", "D"], ["*bf16", "D"],
                            ["*fp32", "D"], ["*fp32", "D"], ["constexpr", 1], ["i32", ""]]
    assert got["a"][-3:] == [["constexpr", True], ["constexpr", 16], ["constexpr", 4]]
    assert got["b"][6:8] == [["i32", "D"], ["i64", "D"]]


@pytest.mark.slow
def test_autocast_emulation_records_what_torch_autocast_does():
    """The meta-device bf16 emulation launches exactly what real autocast does (CPU tensors).

    The ambient U-Net at a quarter of its width: the same layers and dtype flow, and CPU bf16
    convolutions ~10x cheaper than at full width (6 s instead of 64 s for this test here).
    """
    got = _run_snippet("""
import json
from compile_report import record_variants, describe
def keys(device, autocast):
    vs = record_variants("ambient", batch=2, size=16, modes=("bf16",), device=device,
                         autocast=autocast, overrides=["model.unet.dim=24"])
    return sorted(json.dumps([v.op, v.phase, v.kernel.fn.__qualname__, describe(v)]) for v in vs)
print(json.dumps({"emulated": keys("meta", "emulate"), "torch": keys("cpu", "torch")}))
""", timeout=600)
    assert got["emulated"] == got["torch"]
    assert any(":bf16" in k for k in got["torch"])  # autocast did reach the kernels
