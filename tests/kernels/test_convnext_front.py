"""convnext_front: fused Triton op vs the eager reference (forward and all eight gradients).

CPU runs use the Triton interpreter in fp32 on small, awkward shapes; block-size overrides force
the multi-chunk (Chan-merged LN statistics, recompute) and multi-pixel-block paths that the default
CPU tiles would not reach. GPU cases (ambient levels, three dtypes) are in
benchmarks/bench_convnext_front.py and a small one here; they skip without CUDA.
"""

from __future__ import annotations

import pytest
import torch
from depthdif_hpc.kernels import convnext_front, convnext_front_reference
from depthdif_hpc.kernels._testing import CONVNEXT_NAMES, TOL, check_parity, convnext_inputs
from depthdif_hpc.kernels._utils import override_blocks

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (B, C, H, W, present parts, block overrides)
CASES = [
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


@pytest.mark.parametrize(("B", "C", "H", "W", "parts", "blocks"), CASES)
def test_parity_cpu_fp32(B, C, H, W, parts, blocks):
    inputs = convnext_inputs(B, C, H, W, **parts)
    with override_blocks(**blocks):
        errs = check_parity(convnext_front, convnext_front_reference, inputs, CONVNEXT_NAMES)
    present = {"out"} | {f"d{n}" for n, t in zip(CONVNEXT_NAMES, inputs, strict=True) if t is not None}
    assert set(errs) == present


def test_layernorm_stable_with_large_mean():
    """Pre-LN values with mean ~1e3 x their spread: sum-of-squares variance would lose ~all digits.

    The reference runs in fp64; both the single-tile and the Chan-merged multi-chunk statistics
    must stay at fp32 accuracy.
    """
    x, w, b, tb, s, t, g, lb = convnext_inputs(2, 50, 5, 6, film=False)
    b = b + 1000.0
    inputs = [x, w, b, tb, s, t, g, lb]
    check_parity(convnext_front, convnext_front_reference, inputs, CONVNEXT_NAMES,
                 ref_dtype=torch.float64, tol=1e-3)
    with override_blocks(convnext_block_c=16):
        check_parity(convnext_front, convnext_front_reference, inputs, CONVNEXT_NAMES,
                     ref_dtype=torch.float64, tol=1e-3)


def test_parity_check_catches_a_wrong_kernel():
    """The harness must fail on a subtly wrong op (here: LN eps 1e-3 instead of 1e-5)."""
    inputs = convnext_inputs(1, 20, 4, 5)
    wrong = lambda *a: convnext_front(*a, eps=1e-1)  # noqa: E731
    with pytest.raises(AssertionError, match="parity failed"):
        check_parity(wrong, convnext_front_reference, inputs, CONVNEXT_NAMES)


def test_noncontiguous_input_and_model_style_views():
    """channels_last x and (1,C,1,1)-param views / chunked FiLM halves, as ConvNextBlock passes them."""
    B, C, H, W = 2, 20, 5, 6
    x, w, b, tb, _, _, _, _ = convnext_inputs(B, C, H, W)
    film = torch.randn(B, 2 * C)
    s, t = film.chunk(2, dim=1)  # non-contiguous (B, C) views
    g = (1 + 0.1 * torch.randn(1, C, 1, 1)).view(-1)
    lb = (0.1 * torch.randn(1, C, 1, 1)).view(-1)
    xc = x.to(memory_format=torch.channels_last)
    y = convnext_front(xc, w, b, tb, s, t, g, lb)
    ref = convnext_front_reference(x, w, b, tb, s, t, g, lb)
    assert y.shape == ref.shape
    assert torch.allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_input_validation():
    x, w, b, tb, s, t, g, lb = convnext_inputs(1, 8, 4, 4)
    with pytest.raises(ValueError, match="both be given"):
        convnext_front(x, w, b, tb, s, None, g, lb)
    with pytest.raises(ValueError, match="both be given"):
        convnext_front(x, w, b, tb, s, t, g, None)
    with pytest.raises(ValueError, match="time_bias"):
        convnext_front(x, w, b, tb[:, :4], s, t, g, lb)
    with pytest.raises(ValueError, match="dw_weight"):
        convnext_front(x, w[:, :, :3, :3], b, tb, s, t, g, lb)
    with pytest.raises(TypeError, match="float32"):
        convnext_front(x.double(), w, b, tb, s, t, g, lb)


def test_opcheck_fake_and_autograd_registration():
    from depthdif_hpc.kernels.convnext_front import _convnext_front_fwd

    x, w, b, tb, s, t, g, lb = (a.requires_grad_() for a in convnext_inputs(2, 12, 5, 6))
    torch.library.opcheck(_convnext_front_fwd, (x, w, b, tb, s, t, g, lb, 1e-5))
    torch.library.opcheck(_convnext_front_fwd, (x, w, b, None, None, None, None, None, 1e-5))


def test_torch_compile_traces_the_op():
    """fullgraph compile (aot_eager: the fake kernels and autograd formula are traced)."""
    inputs = convnext_inputs(2, 12, 5, 6)
    f = lambda *a: convnext_front(*a).square().sum()  # noqa: E731
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    leaves = [a.clone().requires_grad_() for a in inputs]
    compiled(*leaves).backward()
    ref = [a.clone().requires_grad_() for a in inputs]
    convnext_front_reference(*ref).square().sum().backward()
    for a, r in zip(leaves, ref, strict=True):
        assert torch.allclose(a.grad, r.grad, atol=1e-4, rtol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("parts", [dict(), dict(time_bias=False), dict(film=False, ln=False)],
                         ids=["all", "no-time", "no-film-no-ln"])
def test_parity_gpu_awkward(dtype, parts):
    inputs = convnext_inputs(3, 102, 37, 21, dtype=dtype, device="cuda", **parts)
    check_parity(convnext_front, convnext_front_reference, inputs, CONVNEXT_NAMES, tol=TOL[dtype])
