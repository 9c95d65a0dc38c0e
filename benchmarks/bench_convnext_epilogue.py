"""convnext_front_epilogue: every parity test of the epilogue variant (pytest) and its timing cases.

The variant is `convnext_front` as torch's depthwise conv + one fused bias/FiLM/LayerNorm
kernel (kernels/convnext_epilogue.py). Parity: the output and all eight gradients against
convnext_front_reference evaluated in fp64 on the same rounded inputs (kernels._testing
.check_parity), for every combination of present parts the model uses.
CPU (Triton interpreter, fp32, channels_last): channel counts whose two register parts pad
(50 = 32 + 32), that are not multiples of 16 (102 = 64 + 64: 2-element vectors), a single part
(20, 40), an ambient width (96 = 64 + 32) and the widest (1536 = 1024 + 512); odd H x W; block
overrides that force several pixel blocks per sample; one contiguous NCHW input (converted).
GPU: the four ambient levels (B = 2) and one awkward shape, fp32 / bf16 / fp16, skipped without
CUDA. The op's other tests (the epilogue op alone, unneeded gradients, registration, tracing,
the dispatch table) are in tests/kernels/test_convnext_epilogue.py.
Timing: `cases(batch, dtype)` feeds benchmarks/run.py (eager, the fused v2 front and this
variant, all on channels_last inputs).
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import (
    DTYPES,
    convnext_front,
    convnext_front_epilogue,
    convnext_front_reference,
)
from depthdif_hpc.kernels._testing import (
    AMBIENT_LEVELS,
    CONVNEXT_NAMES,
    TOL,
    check_parity,
    convnext_inputs,
)
from depthdif_hpc.kernels._utils import is_channels_last, override_blocks

CUDA = torch.cuda.is_available()
OP = "convnext_epilogue"

# (B, C, H, W, present parts, block overrides, channels_last)
CPU_CASES = [
    pytest.param(1, 96, 5, 7, dict(), dict(), True, id="ambient-C96-5x7"),
    pytest.param(2, 50, 5, 7, dict(), dict(convnext_epilogue_block_p=8), True,
                 id="B2-C50-5x7-all-5pixblocks"),
    pytest.param(1, 102, 3, 5, dict(ln=False), dict(), True, id="C102-3x5-film-no-ln-first-block"),
    pytest.param(1, 1536, 2, 3, dict(), dict(), True, id="C1536-2x3"),
    pytest.param(2, 52, 3, 5, dict(time_bias=False), dict(convnext_epilogue_block_p=4), True,
                 id="B2-C52-3x5-final-block-4pixblocks"),
    pytest.param(1, 40, 3, 4, dict(ln=False, bias=False), dict(), True, id="C40-3x4-film-no-bias"),
    pytest.param(2, 20, 5, 3, dict(film=False), dict(), True, id="B2-C20-5x3-ln-no-film"),
    pytest.param(2, 20, 5, 3, dict(film=False, ln=False), dict(), True,
                 id="B2-C20-5x3-conv-time-only"),
    pytest.param(1, 50, 3, 5, dict(), dict(), False, id="nchw-input-C50-3x5"),
]

GPU_SHAPES = [
    *(pytest.param(2, C, px, px, id=f"ambient-C{C}-{px}px") for C, px in AMBIENT_LEVELS),
    pytest.param(3, 102, 37, 21, id="awkward-B3-C102-37x21"),
]
GPU_PARTS = [pytest.param(dict(), id="all"), pytest.param(dict(time_bias=False), id="final-block"),
             pytest.param(dict(ln=False), id="no-ln")]


def _check(B, C, H, W, parts, *, dtype=torch.float32, device="cpu", blocks=None,
           channels_last=True):
    inputs = convnext_inputs(B, C, H, W, dtype=dtype, device=device, **parts)
    if channels_last:
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        assert is_channels_last(inputs[0])
    with override_blocks(**(blocks or {})):
        errs = check_parity(convnext_front_epilogue, convnext_front_reference, inputs,
                            CONVNEXT_NAMES, tol=TOL[dtype], ref_dtype=torch.float64)
    present = {"out"} | {f"d{n}" for n, t in zip(CONVNEXT_NAMES, inputs, strict=True) if t is not None}
    assert set(errs) == present


@pytest.mark.parametrize(("B", "C", "H", "W", "parts", "blocks", "channels_last"), CPU_CASES)
def test_parity_cpu(B, C, H, W, parts, blocks, channels_last):
    _check(B, C, H, W, parts, blocks=blocks, channels_last=channels_last)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize(("B", "C", "H", "W"), GPU_SHAPES)
@pytest.mark.parametrize("parts", GPU_PARTS)
def test_parity_gpu(B, C, H, W, dtype, parts):
    _check(B, C, H, W, parts, dtype=DTYPES[dtype], device="cuda")


def cases(batch: int, dtype: torch.dtype, device: str = "cuda", levels=AMBIENT_LEVELS):
    """Timing cases on channels_last inputs: eager (cuDNN NHWC), the fused v2 front ("triton")
    and the epilogue variant; (name, shape, inputs, {impl: fn}, ideal bytes fwd, bwd)."""
    for C, px in levels:
        inputs = convnext_inputs(batch, C, px, px, dtype=dtype, device=device)
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
        n = batch * C * px * px * inputs[0].element_size()
        yield dict(
            op=OP, shape=f"B{batch} C{C} {px}x{px} channels_last", inputs=inputs,
            fns={"eager": convnext_front_reference, "triton": convnext_front,
                 "epilogue": convnext_front_epilogue},
            # As the front: read x, write y; backward read x, dy, write dx.
            bytes_fwd=2 * n, bytes_bwd=3 * n,
        )
