"""linear_attention: every parity test of the op (pytest) and its timing cases (run.py).

Parity is the output and dq, dk, dv against linear_attention_reference
(kernels._testing.check_parity), with scale d^-0.5 as in the model.
CPU (Triton interpreter, fp32): the model's head shape (4 heads x 32) with N = px * (px + 1) for a
few px, so that N is never a multiple of the 64-column block, and awkward shapes: the CPU plan
uses 64-column N blocks and 2 blocks per N slice, so N = 77, 150, 300 exercise partial blocks and
the multi-slice online-softmax merge, d = 24 a padded head, N = 1 a zero dk.
GPU: q, k, v (B, 4 heads, 32, N = px^2) at every ambient level (the head width is fixed at
4 x 32, so C only sets the surrounding projections) and one awkward N = 37 * 21, in fp32, bf16 and
fp16 with kernels._testing.TOL; skipped without CUDA.
Timing: `cases(batch, dtype)` feeds benchmarks/run.py.
The op's other tests (softmax stability, strided views, validation, registration, compile
tracing) are in tests/kernels/test_linear_attention.py.
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import DTYPES, linear_attention, linear_attention_reference
from depthdif_hpc.kernels._testing import (
    AMBIENT_LEVELS,
    TOL,
    check_parity,
    linear_attention_inputs,
)
from depthdif_hpc.kernels._utils import override_blocks

CUDA = torch.cuda.is_available()
OP = "linear_attention"
NAMES = ("q", "k", "v")
SCALE = 32**-0.5

# (B, heads, d, N, block overrides)
CPU_CASES = [
    *(pytest.param(2, 4, 32, px * (px + 1), dict(), id=f"B2-h4-d32-N{px}x{px + 1}") for px in [16, 8, 4, 2]),
    pytest.param(1, 4, 32, 150, dict(), id="B1-h4-d32-N150"),
    pytest.param(3, 4, 32, 77, dict(), id="B3-h4-d32-N77"),
    pytest.param(2, 1, 24, 300, dict(), id="B2-h1-d24(padded)-N300-3slices"),
    pytest.param(1, 2, 16, 45, dict(la_block_n=16, la_blocks_per_split=1), id="B1-h2-d16-N45-3slices"),
    pytest.param(1, 2, 32, 1, dict(), id="N1"),
]

# (B, heads, d, N): the ambient levels, then an N that is a multiple of no block size.
GPU_SHAPES = [
    *(pytest.param(2, 4, 32, px * px, id=f"ambient-C{C}-{px}px") for C, px in AMBIENT_LEVELS),
    pytest.param(3, 4, 32, 37 * 21, id="awkward-B3-N37x21"),
]


def _check(B, heads, d, N, *, dtype=torch.float32, device="cpu", blocks=None):
    with override_blocks(**(blocks or {})):
        errs = check_parity(linear_attention, linear_attention_reference,
                            linear_attention_inputs(B, heads, d, N, dtype=dtype, device=device), NAMES,
                            d**-0.5, tol=TOL[dtype])
    assert set(errs) == {"out", "dq", "dk", "dv"}


@pytest.mark.parametrize(("B", "heads", "d", "N", "blocks"), CPU_CASES)
def test_parity_cpu(B, heads, d, N, blocks):
    _check(B, heads, d, N, blocks=blocks)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("B", "heads", "d", "N"), GPU_SHAPES)
def test_parity_gpu(B, heads, d, N, dtype):
    _check(B, heads, d, N, dtype=DTYPES[dtype], device="cuda")


def cases(batch: int, dtype: torch.dtype, device: str = "cuda", levels=AMBIENT_LEVELS):
    for C, px in levels:
        inputs = linear_attention_inputs(batch, 4, 32, px * px, dtype=dtype, device=device)
        n = inputs[0].numel() * inputs[0].element_size()
        yield dict(op=OP, shape=f"B{batch} h4 d32 N{px * px} (C{C})", inputs=inputs,
                   fns={"eager": linear_attention_reference, "triton": linear_attention},
                   extra=(SCALE,), bytes_fwd=4 * n, bytes_bwd=7 * n)
