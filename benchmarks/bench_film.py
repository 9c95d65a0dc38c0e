"""film: every parity test of the op (pytest) and its timing cases (run.py).

Parity is the output and the three gradients (dscale and dshift are reductions over pixels)
against film_reference (kernels._testing.check_parity).
CPU (Triton interpreter, fp32): the ambient preset's channel counts on a few pixels, and small
awkward shapes, some with block-size overrides that split the pixels and the gradient reductions
into several tiles.
GPU: the four ambient levels (B = 2) and one awkward shape, in fp32, bf16 and fp16 with
kernels._testing.TOL; skipped without CUDA.
Timing: `cases(batch, dtype)` feeds benchmarks/run.py. The target for film is bandwidth (>= 70% of
peak): its minimum traffic is 2 tensors forward (read x, write y) and 3 backward (read dy, x,
write dx), which is exactly what the kernels move.
The op's other tests (validation, registration, compile tracing) are in tests/kernels/test_film.py.
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import DTYPES, film, film_reference
from depthdif_hpc.kernels._testing import AMBIENT_LEVELS, TOL, check_parity, film_inputs
from depthdif_hpc.kernels._utils import override_blocks

CUDA = torch.cuda.is_available()
OP = "film"
NAMES = ("x", "scale", "shift")

# (B, C, H, W, block overrides)
CPU_CASES = [
    *(pytest.param(3, C, H, W, dict(), id=f"ambient-C{C}-{H}x{W}")
      for C, H, W in [(96, 16, 12), (192, 8, 6), (384, 4, 5), (768, 2, 3)]),
    pytest.param(3, 50, 9, 13, dict(), id="B3-C50-9x13"),
    pytest.param(1, 102, 7, 5, dict(), id="B1-C102-7x5"),
    pytest.param(3, 52, 17, 6, dict(film_block_p=32, film_block_r=16), id="B3-C52-17x6-tiled"),
    pytest.param(1, 50, 11, 3, dict(film_block_p=8, film_block_r=4, film_bwd_block_r=8),
                 id="B1-C50-11x3-many-tiles"),
]

# (B, C, H, W): the ambient levels, then a shape that is a multiple of no block size.
GPU_SHAPES = [
    *(pytest.param(2, C, px, px, id=f"ambient-C{C}-{px}px") for C, px in AMBIENT_LEVELS),
    pytest.param(3, 102, 37, 21, id="awkward-B3-C102-37x21"),
]


def _check(B, C, H, W, *, dtype=torch.float32, device="cpu", blocks=None):
    with override_blocks(**(blocks or {})):
        errs = check_parity(film, film_reference, film_inputs(B, C, H, W, dtype=dtype, device=device),
                            NAMES, tol=TOL[dtype])
    assert set(errs) == {"out", "dx", "dscale", "dshift"}


@pytest.mark.parametrize(("B", "C", "H", "W", "blocks"), CPU_CASES)
def test_parity_cpu(B, C, H, W, blocks):
    _check(B, C, H, W, blocks=blocks)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("B", "C", "H", "W"), GPU_SHAPES)
def test_parity_gpu(B, C, H, W, dtype):
    _check(B, C, H, W, dtype=DTYPES[dtype], device="cuda")


def cases(batch: int, dtype: torch.dtype, device: str = "cuda", levels=AMBIENT_LEVELS):
    for C, px in levels:
        inputs = film_inputs(batch, C, px, px, dtype=dtype, device=device)
        n = batch * C * px * px * inputs[0].element_size()
        yield dict(op=OP, shape=f"B{batch} C{C} {px}x{px}", inputs=inputs,
                   fns={"eager": film_reference, "triton": film}, bytes_fwd=2 * n, bytes_bwd=3 * n)
