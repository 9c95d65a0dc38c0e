"""linear_attention: parity at the ambient preset's levels (pytest) and timing cases (run.py).

Shapes: q, k, v (B, 4 heads, 32, N = px^2) at every level (the head width is fixed at 4 x 32, so C
only sets the surrounding projections). CPU (interpreter, fp32) uses N = px * (px + 1) for a few
px so that N is never a multiple of the 64-column block.
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import linear_attention, linear_attention_reference
from depthdif_hpc.kernels._testing import (
    AMBIENT_LEVELS,
    DTYPES,
    TOL,
    check_parity,
    linear_attention_inputs,
)

CUDA = torch.cuda.is_available()
OP = "linear_attention"
NAMES = ("q", "k", "v")
SCALE = 32**-0.5


@pytest.mark.parametrize("px", [16, 8, 4, 2])
def test_parity_cpu(px):
    check_parity(linear_attention, linear_attention_reference,
                 linear_attention_inputs(2, 4, 32, px * (px + 1)), NAMES, SCALE)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("C", "px"), AMBIENT_LEVELS, ids=lambda v: str(v))
def test_parity_gpu_ambient_levels(C, px, dtype):
    dt = DTYPES[dtype]
    check_parity(linear_attention, linear_attention_reference,
                 linear_attention_inputs(2, 4, 32, px * px, dtype=dt, device="cuda"), NAMES,
                 SCALE, tol=TOL[dt])


def cases(batch: int, dtype: torch.dtype, device: str = "cuda", levels=AMBIENT_LEVELS):
    for C, px in levels:
        inputs = linear_attention_inputs(batch, 4, 32, px * px, dtype=dtype, device=device)
        n = inputs[0].numel() * inputs[0].element_size()
        yield dict(op=OP, shape=f"B{batch} h4 d32 N{px * px} (C{C})", inputs=inputs,
                   fns={"eager": linear_attention_reference, "triton": linear_attention},
                   extra=(SCALE,), bytes_fwd=4 * n, bytes_bwd=7 * n)
