"""convnext_front: every parity test of the fused op (pytest) and its timing cases (run.py).

Parity is the output and all eight gradients against convnext_front_reference evaluated in fp64
(kernels._testing.check_parity), for each combination of present parts the model uses, for
contiguous NCHW inputs (the v1 kernels of convnext_front.py) and channels_last inputs (the NHWC
v2 kernels of convnext_front_nhwc.py).
CPU (Triton interpreter, fp32): the ambient preset's channel counts (C = 96/192/384/768) on a few
pixels with H != W, which on CPU also takes the multi-chunk LN path for C = 384 and 768, and small
awkward shapes whose block-size overrides force the multi-chunk (Chan-merged LN statistics,
recompute) and multi-pixel-block paths that the default CPU tiles would not reach.
channels_last: odd channel counts, odd H x W, C up to 1536, forced multi-block paths.
GPU: the four ambient levels (B = 2) and one awkward shape, in fp32, bf16 and fp16 with
kernels._testing.TOL, in both memory formats; skipped without CUDA.
Timing: `cases(batch, dtype)` feeds benchmarks/run.py (eager, torch.compile(eager), Triton).
The op's other tests (validation, registration, compile tracing, LN stability) are in
tests/kernels/test_convnext_front.py.
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import DTYPES, convnext_front, convnext_front_reference
from depthdif_hpc.kernels._testing import (
    AMBIENT_LEVELS,
    CONVNEXT_NAMES,
    TOL,
    check_parity,
    convnext_inputs,
)
from depthdif_hpc.kernels._utils import is_channels_last, override_blocks

CUDA = torch.cuda.is_available()
OP = "convnext_front"

# (B, C, H, W, present parts, block overrides)
CPU_CASES = [
    *(pytest.param(1, C, H, W, dict(), dict(), id=f"ambient-C{C}-{H}x{W}")
      for C, H, W in [(96, 8, 9), (192, 4, 5), (384, 4, 3), (768, 2, 3)]),
    pytest.param(3, 50, 9, 13, dict(), dict(convnext_block_p=64, convnext_dw_block_p=64),
                 id="B3-C50-9x13-all-2pixblocks"),
    pytest.param(1, 102, 7, 5, dict(), dict(convnext_block_c=32), id="B1-C102-7x5-all-4chunks"),
    pytest.param(2, 52, 10, 6, dict(time_bias=False), dict(), id="B2-C52-10x6-no-time"),
    pytest.param(3, 50, 5, 11, dict(film=False, ln=False), dict(convnext_dw_block_c=16),
                 id="B3-C50-5x11-time-only-first-block"),
    pytest.param(1, 52, 6, 9, dict(time_bias=False, ln=False), dict(), id="B1-C52-6x9-film-only"),
    pytest.param(2, 20, 9, 4, dict(time_bias=False, film=False, ln=False), dict(),
                 id="B2-C20-9x4-conv-only"),
    pytest.param(2, 50, 4, 7, dict(film=False), dict(convnext_block_c=32), id="B2-C50-4x7-ln-no-film-2chunks"),
    pytest.param(1, 50, 3, 8, dict(film=False, bias=False), dict(convnext_block_c=32, convnext_block_p=16),
                 id="B1-C50-3x8-no-bias-no-film-2chunks-2pixblocks"),
    pytest.param(1, 102, 2, 3, dict(ln=False), dict(convnext_block_c=64), id="B1-C102-2x3-film-no-ln-2chunks"),
]

# channels_last inputs (the NHWC v2 kernels), same tuple layout. Channel parts: 96 = 64 + 32,
# 50 = 32 + 32 (14 padded lanes), 102 = 64 + 64 with C % 16 != 0 (2-element vectors), 1536 =
# 1024 + 512 (the largest width, one pass); 20 is a single part. The overrides force several
# pixel blocks in every kernel, two dx/dw channel chunks (32 of 50, the second one partial)
# and dw programs walking two tiles.
NHWC_MULTI = dict(convnext_nhwc_block_p=16, convnext_nhwc_conv_block_p=16,
                  convnext_nhwc_conv_block_c=32, convnext_nhwc_dw_tiles=2)
CPU_NHWC_CASES = [
    pytest.param(1, 96, 4, 5, dict(), dict(), id="nhwc-ambient-C96-4x5"),
    pytest.param(1, 50, 5, 7, dict(), NHWC_MULTI, id="nhwc-C50-5x7-all-multiblock"),
    pytest.param(1, 102, 3, 5, dict(ln=False), dict(), id="nhwc-C102-3x5-first-block"),
    pytest.param(1, 1536, 2, 3, dict(), dict(), id="nhwc-C1536-2x3"),
    pytest.param(2, 52, 3, 5, dict(time_bias=False), dict(convnext_nhwc_block_p=8),
                 id="nhwc-B2-C52-3x5-final-block-2pixblocks"),
    pytest.param(2, 20, 5, 3, dict(time_bias=False, film=False, ln=False), dict(),
                 id="nhwc-B2-C20-5x3-conv-only"),
    pytest.param(1, 40, 3, 4, dict(ln=False, bias=False), dict(), id="nhwc-C40-3x4-film-no-ln-no-bias"),
]

# (B, C, H, W): the ambient levels, then a shape that is a multiple of no block size.
GPU_SHAPES = [
    *(pytest.param(2, C, px, px, id=f"ambient-C{C}-{px}px") for C, px in AMBIENT_LEVELS),
    pytest.param(3, 102, 37, 21, id="awkward-B3-C102-37x21"),
]
# Part sets: every input present; no time bias (the U-Net's final block has no time MLP); no FiLM
# and no LN (the first block, which has no LN, in a U-Net without coordinate conditioning).
GPU_PARTS = [pytest.param(dict(), id="all"), pytest.param(dict(time_bias=False), id="final-block"),
             pytest.param(dict(film=False, ln=False), id="first-block")]


def _check(B, C, H, W, parts, *, dtype=torch.float32, device="cpu", blocks=None,
           channels_last=False):
    inputs = convnext_inputs(B, C, H, W, dtype=dtype, device=device, **parts)
    if channels_last:
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        assert is_channels_last(inputs[0])  # B, C, H, W > 1: the NHWC kernels run
    with override_blocks(**(blocks or {})):
        errs = check_parity(convnext_front, convnext_front_reference, inputs, CONVNEXT_NAMES,
                            tol=TOL[dtype], ref_dtype=torch.float64)
    # An input left out (None) must not be compared, and every present one must be.
    present = {"out"} | {f"d{n}" for n, t in zip(CONVNEXT_NAMES, inputs, strict=True) if t is not None}
    assert set(errs) == present


@pytest.mark.parametrize(("B", "C", "H", "W", "parts", "blocks"), CPU_CASES)
def test_parity_cpu(B, C, H, W, parts, blocks):
    _check(B, C, H, W, parts, blocks=blocks)


@pytest.mark.parametrize(("B", "C", "H", "W", "parts", "blocks"), CPU_NHWC_CASES)
def test_parity_cpu_channels_last(B, C, H, W, parts, blocks):
    _check(B, C, H, W, parts, blocks=blocks, channels_last=True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("B", "C", "H", "W"), GPU_SHAPES)
@pytest.mark.parametrize("parts", GPU_PARTS)
def test_parity_gpu(B, C, H, W, dtype, parts, channels_last):
    _check(B, C, H, W, parts, dtype=DTYPES[dtype], device="cuda", channels_last=channels_last)


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
