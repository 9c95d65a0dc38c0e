"""convnext_front: parity at the ambient preset's levels (pytest) and timing cases (run.py).

Parity: GPU at the four ambient levels (C = 96/192/384/768 at 128/64/32/16 px, B = 2) in fp32, bf16,
fp16 with kernels._testing.TOL; CPU (interpreter, fp32) at the same channel counts on a few pixels
(H != W), which on CPU also takes the multi-chunk LN path for C = 384 and 768.
Timing: `cases(batch, dtype)` feeds benchmarks/run.py (eager, torch.compile(eager), Triton).
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import convnext_front, convnext_front_reference
from depthdif_hpc.kernels._testing import (
    AMBIENT_LEVELS,
    CONVNEXT_NAMES,
    DTYPES,
    TOL,
    check_parity,
    convnext_inputs,
)

CUDA = torch.cuda.is_available()
OP = "convnext_front"


@pytest.mark.parametrize(("C", "H", "W"), [(96, 8, 9), (192, 4, 5), (384, 4, 3), (768, 2, 3)],
                         ids=lambda v: str(v))
def test_parity_cpu_ambient_channels(C, H, W):
    check_parity(convnext_front, convnext_front_reference, convnext_inputs(1, C, H, W), CONVNEXT_NAMES)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("C", "px"), AMBIENT_LEVELS, ids=lambda v: str(v))
@pytest.mark.parametrize("parts", [dict(), dict(time_bias=False), dict(film=False, ln=False)],
                         ids=["all", "final-block", "first-block"])
def test_parity_gpu_ambient_levels(C, px, dtype, parts):
    dt = DTYPES[dtype]
    inputs = convnext_inputs(2, C, px, px, dtype=dt, device="cuda", **parts)
    check_parity(convnext_front, convnext_front_reference, inputs, CONVNEXT_NAMES, tol=TOL[dt])


def cases(batch: int, dtype: torch.dtype, device: str = "cuda", levels=AMBIENT_LEVELS):
    """Timing cases: (name, shape, inputs, {impl: fn}, ideal bytes fwd, ideal bytes bwd)."""
    for C, px in levels:
        inputs = convnext_inputs(batch, C, px, px, dtype=dtype, device=device)
        n = batch * C * px * px * inputs[0].element_size()
        yield dict(
            op=OP, shape=f"B{batch} C{C} {px}x{px}", inputs=inputs,
            fns={"eager": convnext_front_reference, "triton": convnext_front},
            # The unavoidable traffic: read x, write y; backward read x, dy, write dx.
            bytes_fwd=2 * n, bytes_bwd=3 * n,
        )
