"""layer_norm: every parity test of the op (pytest) and its timing cases (run.py).

Parity is the output and dx, dweight, dbias (the last two reductions over batch and pixels)
against layer_norm_reference evaluated in fp64 on the same rounded inputs
(kernels._testing.check_parity).
CPU (Triton interpreter, fp32, and one bf16-activation case): the ambient preset's attention widths on a few pixels, in NCHW and
channels_last; odd channel counts (not multiples of 16) and odd H x W; C = 1536 in one register
tile; block-size overrides that force the channel-chunked path (Chan-merged statistics), several
pixel blocks per backward program and partial last blocks.
GPU: the four ambient levels (B = 2) in both layouts and one awkward shape, in fp32, bf16 and fp16
with kernels._testing.TOL; skipped without CUDA.
Timing: `cases(batch, dtype)` feeds benchmarks/run.py. The target is bandwidth: the minimum
traffic is 2 tensors forward (read x, write y) and 3 backward (read x and dy, write dx), plus
8 bytes of statistics per pixel each way, which is what the kernels move.
The op's other tests (layouts, validation, registration, compile tracing, the U-Net's PreNorm)
are in tests/kernels/test_layer_norm.py.
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import DTYPES, layer_norm, layer_norm_reference
from depthdif_hpc.kernels._testing import (
    AMBIENT_LEVELS,
    LAYER_NORM_NAMES,
    TOL,
    check_parity,
    layer_norm_inputs,
)
from depthdif_hpc.kernels._utils import override_blocks

CUDA = torch.cuda.is_available()
OP = "layer_norm"
EPS = 1e-5

# (B, C, H, W, channels_last, block overrides)
CPU_CASES = [
    *(pytest.param(2, C, H, W, cl, dict(), id=f"ambient-C{C}-{H}x{W}-{'nhwc' if cl else 'nchw'}")
      for C, H, W in [(96, 12, 10), (192, 6, 5), (384, 4, 3), (768, 2, 3)] for cl in (False, True)),
    pytest.param(3, 51, 9, 13, True, dict(), id="B3-C51-9x13-nhwc"),
    pytest.param(1, 102, 7, 5, False, dict(), id="B1-C102-7x5-nchw"),
    pytest.param(1, 1536, 3, 5, True, dict(), id="B1-C1536-3x5-nhwc-one-tile"),
    pytest.param(2, 33, 11, 1, True, dict(layer_norm_block_p=4, layer_norm_blocks_per_prog=4),
                 id="B2-C33-11x1-nhwc-4-blocks-per-program"),
    pytest.param(1, 51, 9, 13, False, dict(layer_norm_block_c=16),
                 id="B1-C51-9x13-nchw-4-chunks"),
    pytest.param(2, 70, 5, 3, True, dict(layer_norm_block_c=32, layer_norm_block_p=8),
                 id="B2-C70-5x3-nhwc-3-chunks-2-pixel-blocks"),
]

# (B, C, H, W, channels_last): the ambient levels, then a shape that is a multiple of no block.
GPU_SHAPES = [
    *(pytest.param(2, C, px, px, cl, id=f"ambient-C{C}-{px}px-{'nhwc' if cl else 'nchw'}")
      for C, px in AMBIENT_LEVELS for cl in (False, True)),
    pytest.param(3, 1537, 37, 21, True, id="awkward-B3-C1537-37x21-nhwc-chunked"),
    pytest.param(3, 102, 37, 21, False, id="awkward-B3-C102-37x21-nchw"),
]


def _check(B, C, H, W, channels_last, *, dtype=torch.float32, device="cpu", blocks=None):
    inputs = layer_norm_inputs(B, C, H, W, dtype=dtype, device=device, channels_last=channels_last)
    with override_blocks(**(blocks or {})):
        errs = check_parity(layer_norm, layer_norm_reference, inputs, LAYER_NORM_NAMES, EPS,
                            tol=TOL[dtype], ref_dtype=torch.float64)
    assert set(errs) == {"out", "dx", "dweight", "dbias"}
    return errs


@pytest.mark.parametrize(("B", "C", "H", "W", "channels_last", "blocks"), CPU_CASES)
def test_parity_cpu(B, C, H, W, channels_last, blocks):
    _check(B, C, H, W, channels_last, blocks=blocks)


def test_parity_cpu_bf16_activations_fp32_params():
    """The training mix (bf16 x, fp32 weight and bias, as under autocast) at TOL[bf16]; the
    interpreter rounds bf16 stores by truncation, still well inside the tolerance."""
    x, w, b = layer_norm_inputs(2, 51, 9, 13, channels_last=True)
    errs = check_parity(layer_norm, layer_norm_reference, [x.bfloat16(), w, b], LAYER_NORM_NAMES,
                        EPS, tol=TOL[torch.bfloat16], ref_dtype=torch.float64)
    assert set(errs) == {"out", "dx", "dweight", "dbias"}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("B", "C", "H", "W", "channels_last"), GPU_SHAPES)
def test_parity_gpu(B, C, H, W, channels_last, dtype):
    _check(B, C, H, W, channels_last, dtype=DTYPES[dtype], device="cuda")


def cases(batch: int, dtype: torch.dtype, device: str = "cuda", levels=AMBIENT_LEVELS):
    for C, px in levels:
        for cl in (True, False):
            inputs = layer_norm_inputs(batch, C, px, px, dtype=dtype, device=device,
                                       channels_last=cl)
            n = inputs[0].numel() * inputs[0].element_size()
            stats = 8 * batch * px * px  # fp32 mean and rstd per pixel
            yield dict(op=OP, shape=f"B{batch} C{C} {px}x{px} {'NHWC' if cl else 'NCHW'}",
                       inputs=inputs, fns={"eager": layer_norm_reference, "triton": layer_norm},
                       extra=(EPS,), bytes_fwd=2 * n + stats, bytes_bwd=3 * n + stats)
