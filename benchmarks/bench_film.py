"""film: parity at the ambient preset's levels (pytest) and timing cases (run.py).

The target for film is bandwidth (>= 70% of peak): its minimum traffic is 2 tensors forward
(read x, write y) and 3 backward (read dy, x, write dx), which is exactly what the kernels move.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from depthdif_hpc.kernels import film, film_reference
from depthdif_hpc.kernels._testing import AMBIENT_LEVELS, DTYPES, TOL, check_parity, film_inputs

CUDA = torch.cuda.is_available()
OP = "film"
NAMES = ("x", "scale", "shift")


@pytest.mark.parametrize(("C", "H", "W"), [(96, 16, 12), (192, 8, 6), (384, 4, 5), (768, 2, 3)],
                         ids=lambda v: str(v))
def test_parity_cpu_ambient_channels(C, H, W):
    check_parity(film, film_reference, film_inputs(3, C, H, W), NAMES)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("C", "px"), AMBIENT_LEVELS, ids=lambda v: str(v))
def test_parity_gpu_ambient_levels(C, px, dtype):
    dt = DTYPES[dtype]
    check_parity(film, film_reference, film_inputs(2, C, px, px, dtype=dt, device="cuda"), NAMES,
                 tol=TOL[dt])


def test_run_driver_smoke(tmp_path: Path):
    """benchmarks/run.py --smoke: the timing driver end to end on tiny shapes (CPU or GPU)."""
    env = dict(os.environ)
    if not CUDA:
        env["TRITON_INTERPRET"] = "1"
    run = Path(__file__).with_name("run.py")
    res = subprocess.run([sys.executable, str(run), "--smoke", "--out", str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    csv = list(tmp_path.glob("*.csv"))
    md = list(tmp_path.glob("*.md"))
    assert len(csv) == 1 and len(md) == 1
    lines = csv[0].read_text().splitlines()
    header = lines[0].split(",")
    assert {"op", "shape", "impl", "fwd_ms", "bwd_ms", "fwdbwd_ms", "peak_mem_mb"} <= set(header)
    impls = {line.split(",")[header.index("impl")] for line in lines[1:]}
    assert {"eager", "triton"} <= impls
    ops = {line.split(",")[0] for line in lines[1:]}
    assert ops == {"convnext_front", "film", "linear_attention", "unet_train_step"}


def cases(batch: int, dtype: torch.dtype, device: str = "cuda", levels=AMBIENT_LEVELS):
    for C, px in levels:
        inputs = film_inputs(batch, C, px, px, dtype=dtype, device=device)
        n = batch * C * px * px * inputs[0].element_size()
        yield dict(op=OP, shape=f"B{batch} C{C} {px}x{px}", inputs=inputs,
                   fns={"eager": film_reference, "triton": film}, bytes_fwd=2 * n, bytes_bwd=3 * n)
